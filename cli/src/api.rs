//! The agent's HTTP/JSON API. Handlers parse the request and hand it to one owner (the
//! membership handle or the control service); they decide nothing themselves.
//!
//! | route | does |
//! |---|---|
//! | `GET /v1/health` | liveness, no auth |
//! | `GET /v1/ready` | 200 when a Raft leader answers this member, else 503; no auth |
//! | `GET /v1/metrics` | Prometheus text; no auth unless `--metrics-need-token` |
//! | `GET /v1/audit?after=SEQ&limit=N` | this node's audit records (operator) |
//! | `GET /v1/openapi.json` | this table as OpenAPI 3.1, from the handlers' attributes; no auth |
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
use axum::{Json, Router};
use blx_membership::token::TokenId;
use blx_membership::{Member, Membership, NodeId};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::control::AgentControl;

/// What the handlers share, behind one `Arc`: axum clones the state for every request, and
/// a clone of the fields themselves (a dozen reference counts, two paths and a string) was a
/// visible share of a busy leader's CPU.
#[derive(Clone)]
pub(crate) struct ApiState(Arc<ApiShared>);

impl ApiState {
    pub(crate) fn new(shared: ApiShared) -> Self {
        ApiState(Arc::new(shared))
    }
}

impl std::ops::Deref for ApiState {
    type Target = ApiShared;
    fn deref(&self) -> &ApiShared {
        &self.0
    }
}

/// The fields of [`ApiState`].
pub(crate) struct ApiShared {
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
    /// The OpenAPI description, made with the router.
    pub(crate) openapi: Arc<std::sync::OnceLock<serde_json::Value>>,
}

/// What `GET /v1/ready` answers.
#[derive(Serialize, Deserialize, Clone, Debug, utoipa::ToSchema)]
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
#[derive(Serialize, Deserialize, Debug, Clone, utoipa::ToSchema)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct MemberView {
    pub id: String,
    pub name: String,
    #[schema(value_type = String)]
    pub addr: SocketAddr,
    pub state: String,
    pub incarnation: u16,
    pub generation: u64,
    pub labels: std::collections::BTreeMap<String, String>,
    pub zone: Option<String>,
    pub roles: Vec<String>,
    #[schema(value_type = std::collections::BTreeMap<String, String>)]
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    ttl_secs: u64,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[allow(missing_docs)] // JSON shapes: each field is the JSON field of that name.
pub struct CreatedToken {
    pub token: String,
}

/// The API's routes over `state`, and their OpenAPI description, built from the same
/// `#[utoipa::path]` attributes so that one cannot name a route the other lacks.
pub(crate) fn router(state: ApiState) -> Router {
    let (router, doc) = routes(&state).split_for_parts();
    let _ = state.openapi.set(describe(doc, state.metrics_need_token));
    router
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

/// Every route, with its auth and body limits.
fn routes(state: &ApiState) -> utoipa_axum::router::OpenApiRouter<ApiState> {
    use crate::api_vms as vms;
    use utoipa_axum::{router::OpenApiRouter, routes};
    // Small bodies: keys, values, config, tokens.
    let small = OpenApiRouter::new()
        .routes(routes!(agent_self))
        .routes(routes!(members))
        .routes(routes!(leave))
        .routes(routes!(token_create, token_list))
        .routes(routes!(token_revoke))
        .routes(routes!(status))
        .routes(routes!(kv_get, kv_put, kv_delete))
        .routes(routes!(config_get, config_set))
        .routes(routes!(config_history))
        .routes(routes!(config_rollback))
        .layer(axum::extract::DefaultBodyLimit::max(
            blx_consensus::state::MAX_VALUE_LEN + 1,
        ));
    let snapshot = OpenApiRouter::new()
        .routes(routes!(snapshot_save, snapshot_restore))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_SNAPSHOT));
    let mut authed = small
        .routes(routes!(transfer_leader))
        .routes(routes!(vms::vm_create, vms::vm_list))
        .routes(routes!(vms::vm_get, vms::vm_delete))
        .routes(routes!(vms::vm_logs))
        .routes(routes!(vms::vm_action))
        .routes(routes!(vms::node_list))
        .routes(routes!(vms::node_labels))
        .routes(routes!(vms::node_action))
        .routes(routes!(api_token_create, api_token_list))
        .routes(routes!(api_token_revoke))
        .routes(routes!(audit))
        .merge(snapshot);
    // Open by default, as etcd's `/metrics` is, so a stock Prometheus can scrape it.
    let mut open = OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(openapi_json));
    if state.metrics_need_token {
        authed = authed.routes(routes!(metrics));
    } else {
        open = open.routes(routes!(metrics));
    }
    let authed = authed.route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        crate::access::authenticate,
    ));
    open.merge(authed)
}

/// Routes that answer without a token.
const OPEN_ROUTES: [&str; 3] = ["/v1/health", "/v1/ready", "/v1/openapi.json"];

/// The finished description: the API's name and version, bearer auth on every route that
/// needs a token, the one error shape as every operation's default answer, and the KV
/// route's wildcard written as the plain parameter OpenAPI knows.
fn describe(doc: utoipa::openapi::OpenApi, metrics_need_token: bool) -> serde_json::Value {
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    doc["info"] = serde_json::json!({
        "title": "blx",
        "version": env!("CARGO_PKG_VERSION"),
        "description": "The blx agent's HTTP API. Every route but health, readiness, this \
            description and (unless the agent asks for a token) metrics needs a bearer token.",
    });
    let components = &mut doc["components"];
    components["securitySchemes"]["bearer"] =
        serde_json::json!({"type": "http", "scheme": "bearer"});
    components["schemas"]["Error"] = serde_json::json!({
        "type": "object",
        "required": ["error", "code"],
        "properties": {
            "error": {"type": "string", "description": "what went wrong, in words"},
            "code": {"type": "string", "description": "the status's reason phrase in snake case"},
        },
    });
    if let Some(paths) = doc["paths"].as_object_mut() {
        if let Some(kv) = paths.remove("/v1/kv/{*key}") {
            paths.insert("/v1/kv/{key}".into(), kv);
        }
        for (path, item) in paths.iter_mut() {
            let open = OPEN_ROUTES.contains(&path.as_str())
                || (path == "/v1/metrics" && !metrics_need_token);
            let Some(item) = item.as_object_mut() else {
                continue;
            };
            for op in item.values_mut() {
                op["responses"]["default"] = serde_json::json!({
                    "description": "an error",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                });
                if !open {
                    op["security"] = serde_json::json!([{"bearer": []}]);
                }
            }
        }
    }
    doc
}

#[utoipa::path(get, path = "/v1/health", summary = "The process is up (no token)", responses((status = 200, description = "ok", body = String, content_type = "text/plain")))]
async fn health() -> &'static str {
    "ok"
}

#[utoipa::path(get, path = "/v1/openapi.json", summary = "This description of the API (no token)", responses((status = 200, description = "OpenAPI 3.1", body = serde_json::Value)))]
async fn openapi_json(State(state): State<ApiState>) -> Json<serde_json::Value> {
    Json(state.openapi.get().cloned().unwrap_or_default())
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
    // The fields are recorded once the span is known to be kept: with sampled export most
    // spans are dropped at once, and then never pay for formatting them. Without export the
    // span only gives log lines their context, so it is at debug level, as per-request
    // spans usually are, and the default filter leaves it unmade.
    macro_rules! request_span {
        ($level:expr) => {
            tracing::span!(
                $level,
                "api.request",
                otel.kind = "server",
                http.request.method = tracing::field::Empty,
                http.route = tracing::field::Empty,
                http.response.status_code = tracing::field::Empty,
            )
        };
    }
    let span = if crate::telemetry::traces_exported() {
        request_span!(tracing::Level::INFO)
    } else {
        request_span!(tracing::Level::DEBUG)
    };
    // A caller's W3C trace context makes this request part of its trace.
    crate::telemetry::set_parent(
        &span,
        request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    let started = tokio::time::Instant::now();
    let response = if span.is_disabled() || crate::telemetry::sampled_out(&span) {
        // Not part of any exported trace: the request runs with no span at all, so that
        // what it does below (a proposal, a forwarded write) costs no tracing either.
        drop(span);
        next.run(request).await
    } else {
        crate::telemetry::rename(&span, format!("{method} {route}"));
        span.record("http.request.method", method.as_str());
        span.record("http.route", route.as_str());
        let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
        span.record("http.response.status_code", response.status().as_u16());
        response
    };
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
#[utoipa::path(get, path = "/v1/audit", summary = "This node's audit records", params(("after" = Option<u64>, Query, description = "only records after this sequence number"), ("limit" = Option<u64>, Query, description = "at most this many of the newest, 100 by default")), responses((status = 200, body = Vec<crate::audit::AuditRecord>)))]
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
#[utoipa::path(get, path = "/v1/metrics", summary = "Every metric, in the Prometheus text format 0.0.4", responses((status = 200, description = "the metrics", body = String, content_type = "text/plain; version=0.0.4")))]
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
#[utoipa::path(get, path = "/v1/ready", summary = "A Raft leader has just answered this member (no token)", responses((status = 200, description = "ready", body = Readiness), (status = 503, description = "not ready, and why", body = Readiness)))]
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

#[utoipa::path(get, path = "/v1/agent/self", summary = "This node's id, name and cluster", responses((status = 200, body = serde_json::Value)))]
async fn agent_self(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let members = state.membership.members();
    let me = members.get(&state.self_id).map(MemberView::of);
    Json(
        serde_json::json!({ "id": state.self_id.to_string(), "cluster": state.cluster_id, "member": me }),
    )
}

#[utoipa::path(get, path = "/v1/members", summary = "The member table, as this node sees it", responses((status = 200, body = Vec<MemberView>)))]
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

#[utoipa::path(post, path = "/v1/agent/leave", summary = "Leave the cluster gracefully and stop", responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(post, path = "/v1/tokens", summary = "Create a join token", request_body = CreateToken, responses((status = 200, body = CreatedToken)))]
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

#[utoipa::path(get, path = "/v1/tokens", summary = "List join tokens (ids and status)", responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(delete, path = "/v1/tokens/{id}", summary = "Revoke a join token", params(("id" = String, Path, description = "the token id, 16 hex digits")), responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(post, path = "/v1/api-tokens", summary = "Create an API token (its secret is shown only here)", request_body = serde_json::Value, responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(get, path = "/v1/api-tokens", summary = "List API tokens", responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(delete, path = "/v1/api-tokens/{id}", summary = "Revoke an API token", params(("id" = String, Path, description = "the token id")), responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(get, path = "/v1/status", summary = "Leader, term, indexes, voters and learners", responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(get, path = "/v1/kv/{*key}", summary = "A value (raw body), or with ?recurse the keys under a prefix (JSON)", params(("key" = String, Path, description = "the key; may contain /"), ("cas" = Option<u64>, Query, description = "compare-and-set: only if the key's modify index (0: absent) is this"), ("stale" = Option<bool>, Query, description = "read this node's applied state without asking the leader"), ("recurse" = Option<bool>, Query, description = "list every key under this prefix, as JSON")), responses((status = 200, description = "the value", body = Vec<u8>, content_type = "application/octet-stream")))]
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

#[utoipa::path(put, path = "/v1/kv/{*key}", summary = "Set a value (the raw body)", request_body(content = Vec<u8>, content_type = "application/octet-stream"), params(("key" = String, Path, description = "the key; may contain /"), ("cas" = Option<u64>, Query, description = "compare-and-set: only if the key's modify index (0: absent) is this"), ("stale" = Option<bool>, Query, description = "read this node's applied state without asking the leader"), ("recurse" = Option<bool>, Query, description = "list every key under this prefix, as JSON")), responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(delete, path = "/v1/kv/{*key}", summary = "Delete a key", params(("key" = String, Path, description = "the key; may contain /"), ("cas" = Option<u64>, Query, description = "compare-and-set: only if the key's modify index (0: absent) is this"), ("stale" = Option<bool>, Query, description = "read this node's applied state without asking the leader"), ("recurse" = Option<bool>, Query, description = "list every key under this prefix, as JSON")), responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(get, path = "/v1/config", summary = "The cluster configuration", responses((status = 200, body = serde_json::Value)))]
async fn config_get(State(state): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let s = state.cluster.read(false).await.map_err(cluster_error)?;
    Ok(Json(
        serde_json::json!({ "version": s.config.0, "config": s.config.1 }),
    ))
}

#[utoipa::path(get, path = "/v1/config/history", summary = "Earlier versions of the configuration", responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(put, path = "/v1/config", summary = "Replace the cluster configuration (unknown fields refused)", request_body = serde_json::Value, responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(post, path = "/v1/config/rollback", summary = "Restore the previous configuration", responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(post, path = "/v1/operator/transfer-leader", summary = r#"Hand leadership to a voter ({"to": "ID"}, or any)"#, request_body = serde_json::Value, responses((status = 200, body = serde_json::Value)))]
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

#[utoipa::path(get, path = "/v1/operator/snapshot", summary = "Save the replicated state", responses((status = 200, body = Vec<u8>, content_type = "application/octet-stream")))]
async fn snapshot_save(State(state): State<ApiState>) -> Result<Response, ApiError> {
    let s = state.cluster.read(false).await.map_err(cluster_error)?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/octet-stream")],
        blx_consensus::machine::encode(&s.without_secrets()),
    )
        .into_response())
}

#[utoipa::path(put, path = "/v1/operator/snapshot", summary = "Restore a saved state", request_body(content = Vec<u8>, content_type = "application/octet-stream"), responses((status = 200, body = serde_json::Value)))]
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
