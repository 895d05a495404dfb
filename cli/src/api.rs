//! The agent's HTTP/JSON API. Handlers parse the request and hand it to one owner (the
//! membership handle or the control service); they decide nothing themselves.
//!
//! | route | does |
//! |---|---|
//! | `GET /v1/health` | liveness, no auth |
//! | `GET /v1/ready` | 200 when a Raft leader answers this member, else 503; no auth |
//! | `GET /v1/metrics` | Prometheus text; no auth unless `--metrics-need-token` |
//! | `GET /v1/audit?after=SEQ&limit=N` | this node's audit records (operator) |
//!
//! Every other route needs a bearer token of the scope [`crate::access::route_scope`] names.
//! | `GET /v1/agent/self` | this node's id, name and cluster |
//! | `GET /v1/members` | the member table |
//! | `POST /v1/agent/leave` | leave gracefully and stop |
//! | `POST /v1/tokens` `{"ttl_secs": N}` | create a join token |
//! | `GET /v1/tokens` | list tokens |
//! | `DELETE /v1/tokens/{id}` | revoke a token |
//! | `POST /v1/api-tokens` `{"name": "ci", "scope": "write", "ttl_secs": N}` | create an API token |
//! | `GET /v1/api-tokens` | list API tokens |
//! | `DELETE /v1/api-tokens/{id}` | revoke an API token |
//! | `GET /v1/status` | leader, term, indexes, voters, learners |
//! | `GET /v1/kv/{key}` | a value (raw body); `?recurse` lists by prefix (JSON); `?stale` reads locally |
//! | `PUT /v1/kv/{key}` | set a value (raw body); `?cas=INDEX` compare-and-set |
//! | `DELETE /v1/kv/{key}` | delete; `?cas=INDEX` |
//! | `GET /v1/config`, `PUT /v1/config` | the cluster config (JSON, unknown fields refused) |
//! | `GET /v1/config/history`, `POST /v1/config/rollback` | earlier versions; restore the previous one |
//! | `POST /v1/operator/transfer-leader` `{"to": "ID"}` | hand leadership to a voter |
//! | `GET /v1/operator/snapshot`, `PUT /v1/operator/snapshot` | save the state; restore it (binary) |
//! | `/v1/vms...`, `/v1/nodes...` | VMs and nodes: see `api_vms` |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use blx_membership::token::TokenId;
use blx_membership::{Member, Membership, NodeId};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::control::AgentControl;

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct ApiState {
    pub(crate) membership: Membership,
    pub(crate) control: Arc<AgentControl>,
    pub(crate) cluster: crate::raft::Cluster,
    pub(crate) shutdown: Arc<Notify>,
    /// The local token (see [`crate::access`]).
    pub(crate) local_token: Arc<String>,
    /// For new API tokens.
    pub(crate) entropy: crate::world::Entropy,
    pub(crate) self_id: NodeId,
    pub(crate) cluster_id: String,
    /// This node's guest image folder.
    pub(crate) images: std::path::PathBuf,
    /// The last readiness check and when it was made (see [`ready`]).
    pub(crate) readiness: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Readiness)>>>,
    /// `/v1/metrics` asks for a read token too.
    pub(crate) metrics_need_token: bool,
}

/// What `GET /v1/ready` answers.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct Readiness {
    pub ready: bool,
    /// The leader that answered, as a node id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// Why this node is not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// How long a readiness check waits for the leader.
const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);
/// How long one readiness check's answer is reused.
const READY_REUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// A member as the API and `blx members --output json` show it.
#[derive(Serialize, Deserialize, Debug, Clone)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct MemberView {
    pub id: String,
    pub name: String,
    pub addr: SocketAddr,
    pub state: String,
    pub incarnation: u16,
    pub generation: u64,
    pub labels: std::collections::BTreeMap<String, String>,
    pub zone: Option<String>,
    pub roles: Vec<String>,
    pub endpoints: std::collections::BTreeMap<String, SocketAddr>,
}

impl MemberView {
    fn of(m: &Member) -> Self {
        let meta = m.meta.clone().unwrap_or_default();
        MemberView {
            id: m.identity.id.to_string(),
            name: meta.name,
            addr: m.identity.addr,
            state: m.state.to_string(),
            incarnation: m.incarnation,
            generation: m.identity.generation,
            labels: meta.labels,
            zone: meta.zone,
            roles: meta
                .roles
                .iter()
                .map(|r| format!("{r:?}").to_lowercase())
                .collect(),
            endpoints: meta.endpoints,
        }
    }
}

/// An API error: a status and a message, sent as `{"error": "...", "code": "..."}`, the one
/// shape of every error the API answers.
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

/// The stable code of an error status: its HTTP reason phrase in snake case (`not_found`,
/// `unauthorized`, `service_unavailable`), so a client can branch on it without parsing the
/// message.
pub(crate) fn error_code(status: StatusCode) -> String {
    status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.1, "code": error_code(self.0) });
        (self.0, Json(body)).into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    ttl_secs: u64,
}

#[derive(Serialize, Deserialize)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct CreatedToken {
    pub token: String,
}

/// The API's routes over `state`.
pub(crate) fn router(state: ApiState) -> Router {
    let authed = Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/members", get(members))
        .route("/v1/agent/leave", post(leave))
        .route("/v1/tokens", post(token_create).get(token_list))
        .route("/v1/tokens/{id}", delete(token_revoke))
        .route("/v1/status", get(status))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/config", get(config_get).put(config_set))
        .route("/v1/config/history", get(config_history))
        .route("/v1/config/rollback", post(config_rollback))
        .layer(axum::extract::DefaultBodyLimit::max(
            blx_consensus::state::MAX_VALUE_LEN + 1,
        ))
        .route("/v1/operator/transfer-leader", post(transfer_leader))
        .route(
            "/v1/vms",
            post(crate::api_vms::vm_create).get(crate::api_vms::vm_list),
        )
        .route(
            "/v1/vms/{name}",
            get(crate::api_vms::vm_get).delete(crate::api_vms::vm_delete),
        )
        .route("/v1/vms/{name}/logs", get(crate::api_vms::vm_logs))
        .route("/v1/vms/{name}/{action}", post(crate::api_vms::vm_action))
        .route("/v1/nodes", get(crate::api_vms::node_list))
        .route(
            "/v1/nodes/{node}/labels",
            axum::routing::put(crate::api_vms::node_labels),
        )
        .route(
            "/v1/nodes/{node}/{action}",
            post(crate::api_vms::node_action),
        )
        .route(
            "/v1/operator/snapshot",
            get(snapshot_save)
                .put(snapshot_restore)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_SNAPSHOT)),
        )
        .route("/v1/api-tokens", post(api_token_create).get(api_token_list))
        .route("/v1/api-tokens/{id}", delete(api_token_revoke))
        .route("/v1/audit", get(audit));
    // Open by default, as etcd's `/metrics` is, so a stock Prometheus can scrape it.
    let (open, authed) = if state.metrics_need_token {
        (Router::new(), authed.route("/v1/metrics", get(metrics)))
    } else {
        (Router::new().route("/v1/metrics", get(metrics)), authed)
    };
    let authed = authed.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        crate::access::authenticate,
    ));
    open.route("/v1/health", get(|| async { "ok" }))
        .route("/v1/ready", get(ready))
        .merge(authed)
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such route".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "this route does not take that method".into(),
            )
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// Counts and times every request by its route's pattern (never the raw path, so the label
/// set stays bounded), method and status.
async fn track(
    State(state): State<ApiState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "api.request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    // A caller's W3C trace context makes this request part of its trace.
    crate::telemetry::set_parent(
        &span,
        request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    let started = tokio::time::Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    state.cluster.metrics.api_request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Only records after this sequence number.
    #[serde(default)]
    after: u64,
    /// At most this many (the newest), 100 by default.
    limit: Option<usize>,
}

/// `GET /v1/audit?after=SEQ&limit=N`: this node's audit records (see [`crate::audit`]).
async fn audit(
    State(state): State<ApiState>,
    query: Result<axum::extract::Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<crate::audit::AuditRecord>>, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(100).min(10_000);
    let audit = state.cluster.audit.clone();
    tokio::task::spawn_blocking(move || audit.read(q.after, limit))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map(Json)
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the audit log: {e}"),
            )
        })
}

/// `GET /v1/metrics`: every metric in Prometheus text format (see [`crate::metrics`]).
async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        state.cluster.metrics.render(),
    )
        .into_response()
}

/// `GET /v1/ready`: 200 when this node is a member (the API serves only after admission)
/// and a Raft leader has just confirmed its leadership to it (a read-index round trip within
/// [`READY_WITHIN`]); 503 with the reason otherwise. It needs no token, for load balancers
/// and systemd, so one check runs at a time and its answer is reused for [`READY_REUSE`]: no
/// caller can turn the route into load on the leader.
async fn ready(State(state): State<ApiState>) -> (StatusCode, Json<Readiness>) {
    let mut last = state.readiness.lock().await;
    let now = tokio::time::Instant::now();
    let answer = match &*last {
        Some((at, answer)) if now.duration_since(*at) < READY_REUSE => answer.clone(),
        _ => {
            let check = tokio::time::timeout(READY_WITHIN, state.cluster.read_index()).await;
            let leader = state.cluster.node.status().leader;
            let answer = match check {
                Ok(Ok(_)) => Readiness {
                    ready: true,
                    leader: leader.map(|l| crate::raft::node_id(l).to_string()),
                    reason: None,
                },
                Ok(Err(e)) => Readiness {
                    ready: false,
                    leader: None,
                    reason: Some(e.to_string()),
                },
                Err(_) => Readiness {
                    ready: false,
                    leader: None,
                    reason: Some(format!("no Raft leader answered within {READY_WITHIN:?}")),
                },
            };
            *last = Some((now, answer.clone()));
            answer
        }
    };
    let code = if answer.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(answer))
}

async fn agent_self(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let members = state.membership.members();
    let me = members.get(&state.self_id).map(MemberView::of);
    Json(
        serde_json::json!({ "id": state.self_id.to_string(), "cluster": state.cluster_id, "member": me }),
    )
}

async fn members(State(state): State<ApiState>) -> Json<Vec<MemberView>> {
    Json(
        state
            .membership
            .members()
            .values()
            .map(MemberView::of)
            .collect(),
    )
}

async fn leave(State(state): State<ApiState>) -> Json<serde_json::Value> {
    // Answer first, then stop: the agent's shutdown path does the leaving.
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        shutdown.notify_one();
    });
    Json(serde_json::json!({ "leaving": true }))
}

/// A token's lifetime must be between a second and a year.
fn check_ttl(ttl_secs: u64) -> Result<(), ApiError> {
    if ttl_secs == 0 || ttl_secs > crate::duration::MAX_TTL.as_secs() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "ttl_secs must be between 1 and 31536000".into(),
        ));
    }
    Ok(())
}

async fn token_create(
    State(state): State<ApiState>,
    body: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<CreatedToken>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    check_ttl(body.ttl_secs)?;
    let token = state
        .control
        .token_create(Duration::from_secs(body.ttl_secs))
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(CreatedToken { token }))
}

async fn token_list(
    State(state): State<ApiState>,
) -> Result<Json<Vec<blx_membership::token::TokenInfo>>, ApiError> {
    state
        .control
        .token_list()
        .await
        .map(Json)
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))
}

async fn token_revoke(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: TokenId = id.parse().map_err(|e: blx_membership::token::TokenError| {
        ApiError(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    match state.control.token_revoke(id).await {
        Ok(true) => Ok(Json(serde_json::json!({ "revoked": id.to_string() }))),
        Ok(false) => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no token with id {id}"),
        )),
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateApiToken {
    name: String,
    scope: blx_consensus::access::Scope,
    ttl_secs: u64,
}

/// A new API token, as `POST /v1/api-tokens` answers: the only time its secret is shown.
#[derive(Serialize, Deserialize)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct CreatedApiToken {
    pub id: String,
    pub token: String,
    pub scope: blx_consensus::access::Scope,
    pub expires_unix: u64,
}

async fn api_token_create(
    State(state): State<ApiState>,
    body: Result<Json<CreateApiToken>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<CreatedApiToken>, ApiError> {
    use blx_consensus::access::{ApiToken, ApiTokenRecord, secret_hash};
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    check_ttl(body.ttl_secs)?;
    let token = ApiToken {
        id: TokenId(state.entropy.bytes()),
        secret: state.entropy.bytes(),
    };
    let now = state.cluster.clock.now_unix();
    let record = ApiTokenRecord {
        id: token.id,
        name: body.name,
        scope: body.scope,
        secret_hash: secret_hash(&token.secret),
        created_unix: now,
        expires_unix: now.saturating_add(body.ttl_secs),
        revoked: false,
    };
    let expires_unix = record.expires_unix;
    let cmd = blx_consensus::state::Command::Authority(
        blx_consensus::authority::AuthorityCommand::ApiTokenPut(record),
    );
    write(&state, cmd).await?;
    tracing::info!(token = %token.id, scope = %body.scope, "created an API token");
    Ok(Json(CreatedApiToken {
        id: token.id.to_string(),
        token: token.to_string(),
        scope: body.scope,
        expires_unix,
    }))
}

async fn api_token_list(
    State(state): State<ApiState>,
) -> Result<Json<Vec<blx_consensus::access::ApiTokenInfo>>, ApiError> {
    let s = state.cluster.read(false).await.map_err(cluster_error)?;
    let now = state.cluster.clock.now_unix();
    Ok(Json(
        s.authority
            .iter()
            .flat_map(|a| a.api_tokens.values())
            .map(|r| r.info(now))
            .collect(),
    ))
}

async fn api_token_revoke(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: TokenId = id.parse().map_err(|e: blx_membership::token::TokenError| {
        ApiError(StatusCode::BAD_REQUEST, e.to_string())
    })?;
    let cmd = blx_consensus::state::Command::Authority(
        blx_consensus::authority::AuthorityCommand::ApiTokenRevoke(id),
    );
    match write(&state, cmd).await? {
        blx_consensus::state::Applied::Revoked { existed: true } => {
            tracing::info!(token = %id, "revoked an API token");
            Ok(Json(serde_json::json!({ "revoked": id.to_string() })))
        }
        blx_consensus::state::Applied::Revoked { existed: false } => Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no API token with id {id}"),
        )),
        other => Err(unexpected(other)),
    }
}

pub(crate) fn cluster_error(e: crate::raft::ClusterError) -> ApiError {
    match e {
        crate::raft::ClusterError::Denied(d) => crate::access::denied(&d),
        e => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// A refused command as an HTTP answer: 409 when the state moved on or the name is taken, 404
/// when what it names does not exist, 400 otherwise.
pub(crate) fn refused(e: blx_consensus::state::CommandError) -> ApiError {
    use blx_consensus::state::CommandError as E;
    let status = match &e {
        E::CasMismatch { .. } | E::VmExists(_) | E::Conflict(_) => StatusCode::CONFLICT,
        E::NoSuchVm(_) | E::NoSuchNode(_) => StatusCode::NOT_FOUND,
        _ => StatusCode::BAD_REQUEST,
    };
    ApiError(status, e.to_string())
}

/// Proposes a command through the leader and turns its outcome into an API answer: the
/// applied result, a refusal (400, or 409 for a failed compare-and-set), or 503.
pub(crate) async fn write(
    state: &ApiState,
    cmd: blx_consensus::state::Command,
) -> Result<blx_consensus::state::Applied, ApiError> {
    state
        .cluster
        .write(cmd)
        .await
        .map_err(cluster_error)?
        .map_err(refused)
}

fn unexpected(applied: blx_consensus::state::Applied) -> ApiError {
    ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("unexpected result {applied:?}"),
    )
}

async fn status(State(state): State<ApiState>) -> Json<blx_consensus::node::Status> {
    Json(state.cluster.node.status())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KvQuery {
    cas: Option<u64>,
    #[serde(default, deserialize_with = "flag")]
    stale: bool,
    #[serde(default, deserialize_with = "flag")]
    recurse: bool,
}

/// `?stale` and `?stale=true` are both true; `?stale=false` is false.
pub(crate) fn flag<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    let s: Option<String> = Option::deserialize(d)?;
    match s.as_deref() {
        None | Some("") | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(serde::de::Error::custom(format!(
            "expected true or false, got {other:?}"
        ))),
    }
}

type Query = Result<axum::extract::Query<KvQuery>, axum::extract::rejection::QueryRejection>;

fn query(q: Query) -> Result<KvQuery, ApiError> {
    q.map(|q| q.0)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))
}

#[derive(Serialize)]
struct KvItem {
    key: String,
    value: String,
    create_index: u64,
    modify_index: u64,
}

async fn kv_get(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    q: Query,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let cluster = state.cluster.read(q.stale).await.map_err(cluster_error)?;
    if q.recurse {
        let items: Vec<KvItem> = cluster
            .list(&key)
            .map(|(k, e)| KvItem {
                key: k.clone(),
                value: String::from_utf8_lossy(&e.value).into_owned(),
                create_index: e.create_index,
                modify_index: e.modify_index,
            })
            .collect();
        return Ok(Json(items).into_response());
    }
    match cluster.kv.get(&key) {
        Some(e) => Ok((
            [("x-blx-index", e.modify_index.to_string())],
            e.value.clone(),
        )
            .into_response()),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("no key {key:?}"))),
    }
}

async fn kv_put(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    q: Query,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = query(q)?;
    let cmd = blx_consensus::state::Command::KvPut {
        key,
        value: body.to_vec(),
        cas: q.cas,
    };
    match write(&state, cmd).await? {
        blx_consensus::state::Applied::Kv { index } => {
            Ok(Json(serde_json::json!({ "index": index })))
        }
        other => Err(unexpected(other)),
    }
}

async fn kv_delete(
    State(state): State<ApiState>,
    Path(key): Path<String>,
    q: Query,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = query(q)?;
    match write(
        &state,
        blx_consensus::state::Command::KvDelete { key, cas: q.cas },
    )
    .await?
    {
        blx_consensus::state::Applied::Deleted { existed } => {
            Ok(Json(serde_json::json!({ "deleted": existed })))
        }
        other => Err(unexpected(other)),
    }
}

async fn config_get(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let s = state.cluster.read(false).await.map_err(cluster_error)?;
    Ok(Json(
        serde_json::json!({ "version": s.config.0, "config": s.config.1 }),
    ))
}

async fn config_history(
    State(state): State<ApiState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let s = state.cluster.read(false).await.map_err(cluster_error)?;
    let mut versions: Vec<serde_json::Value> = s
        .config_history
        .iter()
        .map(|(v, c)| serde_json::json!({ "version": v, "config": c }))
        .collect();
    versions
        .push(serde_json::json!({ "version": s.config.0, "config": s.config.1, "current": true }));
    Ok(Json(serde_json::Value::Array(versions)))
}

async fn config_set(
    State(state): State<ApiState>,
    body: Result<
        Json<blx_consensus::state::ClusterConfig>,
        axum::extract::rejection::JsonRejection,
    >,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(config) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let nodes = state
        .membership
        .members()
        .values()
        .filter(|m| m.state != blx_membership::MemberState::Left)
        .count();
    let cmd = blx_consensus::state::Command::ConfigSet {
        config,
        nodes: u32::try_from(nodes).unwrap_or(u32::MAX),
    };
    config_version(write(&state, cmd).await?)
}

fn config_version(
    applied: blx_consensus::state::Applied,
) -> Result<Json<serde_json::Value>, ApiError> {
    match applied {
        blx_consensus::state::Applied::Config { version } => {
            Ok(Json(serde_json::json!({ "version": version })))
        }
        other => Err(unexpected(other)),
    }
}

async fn config_rollback(
    State(state): State<ApiState>,
) -> Result<Json<serde_json::Value>, ApiError> {
    config_version(write(&state, blx_consensus::state::Command::ConfigRollback).await?)
}

/// Largest snapshot `PUT /v1/operator/snapshot` accepts.
const MAX_SNAPSHOT: usize = 32 * 1024 * 1024;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TransferLeader {
    to: Option<String>,
}

async fn transfer_leader(
    State(state): State<ApiState>,
    body: Option<Json<TransferLeader>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let to = match body.and_then(|b| b.0.to) {
        Some(hex) => Some(u64::from_str_radix(&hex, 16).map_err(|_| {
            ApiError(
                StatusCode::BAD_REQUEST,
                format!("{hex:?} is not a node id (16 hex digits)"),
            )
        })?),
        None => None,
    };
    let leader = state
        .cluster
        .transfer_leader(to)
        .await
        .map_err(|e| ApiError(StatusCode::CONFLICT, e.to_string()))?;
    Ok(Json(
        serde_json::json!({ "leader": format!("{leader:016x}") }),
    ))
}

async fn snapshot_save(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let s = state.cluster.read(false).await.map_err(cluster_error)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        blx_consensus::machine::encode(&s.without_secrets()),
    )
        .into_response())
}

async fn snapshot_restore(
    State(state): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let saved: blx_consensus::state::ClusterState = blx_consensus::machine::decode(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("not a blx snapshot: {e}")))?;
    let keys = saved.kv.len();
    write(
        &state,
        blx_consensus::state::Command::Restore {
            state: Box::new(saved),
        },
    )
    .await?;
    Ok(Json(serde_json::json!({ "restored_keys": keys })))
}
