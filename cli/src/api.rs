//! The agent's HTTP/JSON API. Handlers parse the request and hand it to one owner (the
//! membership handle or the control service); they decide nothing themselves.
//!
//! | route | does |
//! |---|---|
//! | `GET /v1/health` | liveness, no auth |
//! | `GET /v1/agent/self` | this node's id, name and cluster |
//! | `GET /v1/members` | the member table |
//! | `POST /v1/agent/leave` | leave gracefully and stop |
//! | `POST /v1/tokens` `{"ttl_secs": N}` | create a join token |
//! | `GET /v1/tokens` | list tokens |
//! | `DELETE /v1/tokens/{id}` | revoke a token |

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
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
    pub(crate) shutdown: Arc<Notify>,
    pub(crate) api_token: Option<String>,
    pub(crate) self_id: NodeId,
    pub(crate) cluster: String,
}

/// A member as the API and `blx members --output json` show it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub(crate) struct MemberView {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) addr: SocketAddr,
    pub(crate) state: String,
    pub(crate) incarnation: u16,
    pub(crate) generation: u64,
    pub(crate) labels: std::collections::BTreeMap<String, String>,
    pub(crate) zone: Option<String>,
    pub(crate) roles: Vec<String>,
    pub(crate) endpoints: std::collections::BTreeMap<String, SocketAddr>,
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
            roles: meta.roles.iter().map(|r| format!("{r:?}").to_lowercase()).collect(),
            endpoints: meta.endpoints,
        }
    }
}

/// An API error: a status and a message, sent as `{"error": "..."}`.
pub(crate) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    ttl_secs: u64,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct CreatedToken {
    pub(crate) token: String,
}

pub(crate) async fn serve(addr: SocketAddr, state: ApiState) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| anyhow::anyhow!("cannot bind the HTTP API on {addr}: {e}"))?;
    let authed = Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/members", get(members))
        .route("/v1/agent/leave", post(leave))
        .route("/v1/tokens", post(token_create).get(token_list))
        .route("/v1/tokens/{id}", delete(token_revoke))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    let app = Router::new().route("/v1/health", get(|| async { "ok" })).merge(authed).with_state(state);
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP API stopped");
        }
    }))
}

async fn require_token(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &state.api_token {
        let presented = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = presented.is_some_and(|p| {
            p.len() == expected.len() && p.bytes().zip(expected.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        });
        if !ok {
            return ApiError(StatusCode::UNAUTHORIZED, "missing or wrong API token (Authorization: Bearer ...)".into()).into_response();
        }
    }
    next.run(request).await
}

async fn agent_self(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let members = state.membership.members();
    let me = members.get(&state.self_id).map(MemberView::of);
    Json(serde_json::json!({ "id": state.self_id.to_string(), "cluster": state.cluster, "member": me }))
}

async fn members(State(state): State<ApiState>) -> Json<Vec<MemberView>> {
    Json(state.membership.members().values().map(MemberView::of).collect())
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

async fn token_create(State(state): State<ApiState>, body: Result<Json<CreateToken>, axum::extract::rejection::JsonRejection>) -> Result<Json<CreatedToken>, ApiError> {
    let Json(body) = body.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    if body.ttl_secs == 0 || body.ttl_secs > crate::duration::MAX_TTL.as_secs() {
        return Err(ApiError(StatusCode::BAD_REQUEST, "ttl_secs must be between 1 and 31536000".into()));
    }
    let token = state.control.token_create(Duration::from_secs(body.ttl_secs)).await.map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok(Json(CreatedToken { token }))
}

async fn token_list(State(state): State<ApiState>) -> Result<Json<Vec<blx_membership::token::TokenInfo>>, ApiError> {
    state.control.token_list().await.map(Json).map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e))
}

async fn token_revoke(State(state): State<ApiState>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let id: TokenId = id.parse().map_err(|e: blx_membership::token::TokenError| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    match state.control.token_revoke(id).await {
        Ok(true) => Ok(Json(serde_json::json!({ "revoked": id.to_string() }))),
        Ok(false) => Err(ApiError(StatusCode::NOT_FOUND, format!("no token with id {id}"))),
        Err(e) => Err(ApiError(StatusCode::SERVICE_UNAVAILABLE, e)),
    }
}
