//! Who may call the HTTP API. Every route but `/v1/health` and `/v1/ready` needs a bearer
//! token:
//!
//! - the **local token**, which the agent writes to `<data dir>/api.token` (mode 0600) at each
//!   start, so whoever can read the agent's data dir (the agent's user, root) uses the CLI on
//!   that machine without copying anything. It allows everything, as that user could read the
//!   node's key anyway. It is checked here, in constant time, against this agent's copy, and
//!   stops working when the agent restarts.
//! - an **API token** (`blx api-token create`), with a scope, an owner's name and an expiry,
//!   whose record is in the replicated state. It is checked against a linearizable read of
//!   that state, so a revoked token is refused at once everywhere, and when no quorum can
//!   confirm the record the request is refused with 503, never let through.
//!
//! The caller travels with each write the request makes ([`CALLER`]), and the leader checks
//! an API token's record again against the command before proposing it.

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use blx_consensus::access::{ApiToken, Caller, Denied, Scope};
use subtle::ConstantTimeEq;

use crate::api::{ApiError, ApiState};

/// The file in the data dir that holds the local token.
pub const LOCAL_TOKEN_FILE: &str = "api.token";
const LOCAL_PREFIX: &str = "blxlocal1.";

tokio::task_local! {
    /// Who the API request being served is for: set around each authenticated handler, read
    /// by [`crate::raft::Cluster::write`]. Work done outside a request (the node's own
    /// reports, the controllers) has none and is the node's.
    pub(crate) static CALLER: Caller;
}

/// A fresh local token from 32 random bytes.
pub(crate) fn local_token(secret: [u8; 32]) -> String {
    format!("{LOCAL_PREFIX}{}", blx_membership::tls::hex(&secret))
}

/// The scope a request needs, by method and path. Reads need `read`, except token listings
/// and snapshots (which hold every key); changes to keys and VMs need `write`; everything
/// else (tokens, config, nodes, leadership, leave) needs `operator`.
pub(crate) fn route_scope(method: &Method, path: &str) -> Scope {
    let operator_only = ["/v1/tokens", "/v1/api-tokens", "/v1/operator/", "/v1/audit"];
    if operator_only.iter().any(|p| path.starts_with(p)) {
        return Scope::Operator;
    }
    if method == Method::GET || method == Method::HEAD {
        return Scope::Read;
    }
    if path.starts_with("/v1/kv/") || path == "/v1/vms" || path.starts_with("/v1/vms/") {
        return Scope::Write;
    }
    Scope::Operator
}

/// The HTTP answer to a refused token.
pub(crate) fn denied(d: &Denied) -> ApiError {
    let status = if d.unauthenticated() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    ApiError(status, d.to_string())
}

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Authenticates the request, checks its scope, and runs the handler as its caller.
pub(crate) async fn authenticate(
    State(state): State<ApiState>,
    request: Request,
    next: Next,
) -> Response {
    let need = route_scope(request.method(), request.uri().path());
    match caller(&state, bearer(&request), need).await {
        Ok(caller) => CALLER.scope(caller, next.run(request)).await,
        Err(e) => e.into_response(),
    }
}

async fn caller(
    state: &ApiState,
    presented: Option<&str>,
    need: Scope,
) -> Result<Caller, ApiError> {
    let Some(presented) = presented.filter(|p| !p.is_empty()) else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "this API needs a token (Authorization: Bearer ...): on the agent's machine the CLI \
             reads it from <data dir>/api.token; elsewhere use one from `blx api-token create`"
                .into(),
        ));
    };
    if presented.starts_with(LOCAL_PREFIX) {
        let ok: bool = presented
            .as_bytes()
            .ct_eq(state.local_token.as_bytes())
            .into();
        return if ok {
            Ok(Caller::Node)
        } else {
            Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "wrong local API token: the agent writes a new one to <data dir>/api.token each \
                 time it starts (is --data-dir the one of the agent at --api?)"
                    .into(),
            ))
        };
    }
    let token: ApiToken =
        presented
            .parse()
            .map_err(|e: blx_consensus::access::MalformedToken| {
                ApiError(StatusCode::UNAUTHORIZED, e.to_string())
            })?;
    let now = state.cluster.clock.now_unix();
    let checked = state
        .cluster
        .fresh(|s| {
            s.authority
                .as_ref()
                .map(|a| a.authenticate(&token, now, need).map(|_| ()))
        })
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("cannot check the API token without a quorum: {e}"),
            )
        })?;
    match checked {
        None => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cluster's records are not replicated yet; retry shortly".into(),
        )),
        Some(Err(d)) => {
            tracing::warn!(token = %token.id, refusal = %d, "API request refused");
            Err(denied(&d))
        }
        Some(Ok(())) => Ok(Caller::Token(token.id)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_scope_their_effect_needs() {
        let get = Method::GET;
        let put = Method::PUT;
        let post = Method::POST;
        let delete = Method::DELETE;
        assert_eq!(route_scope(&get, "/v1/members"), Scope::Read);
        assert_eq!(route_scope(&get, "/v1/kv/a/b"), Scope::Read);
        assert_eq!(route_scope(&get, "/v1/vms/x/logs"), Scope::Read);
        assert_eq!(route_scope(&put, "/v1/kv/a"), Scope::Write);
        assert_eq!(route_scope(&delete, "/v1/kv/a"), Scope::Write);
        assert_eq!(route_scope(&post, "/v1/vms"), Scope::Write);
        assert_eq!(route_scope(&post, "/v1/vms/x/stop"), Scope::Write);
        assert_eq!(route_scope(&get, "/v1/tokens"), Scope::Operator);
        assert_eq!(route_scope(&post, "/v1/api-tokens"), Scope::Operator);
        assert_eq!(route_scope(&get, "/v1/operator/snapshot"), Scope::Operator);
        assert_eq!(route_scope(&put, "/v1/config"), Scope::Operator);
        assert_eq!(route_scope(&post, "/v1/nodes/x/drain"), Scope::Operator);
        assert_eq!(route_scope(&post, "/v1/agent/leave"), Scope::Operator);
        assert_eq!(route_scope(&post, "/v1/vmsx"), Scope::Operator);
    }

    #[test]
    fn a_local_token_is_long_and_marked() {
        let t = local_token([7; 32]);
        assert!(t.starts_with(LOCAL_PREFIX));
        assert_eq!(t.len(), LOCAL_PREFIX.len() + 64);
    }
}
