//! Simulated clients: each host runs one beside its agent, calling the agent's HTTP API
//! in-process (the same router the API serves) and recording every operation with its call
//! and return times in virtual time. A client dies with its host; its operation in flight is
//! left with an unknown outcome, as a real client's would be.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tower::ServiceExt;

use crate::linearizability::{KvOp, KvResult, Operation};
use crate::world::{lock, now};

/// The keys the clients work on: few, so that operations contend.
pub(crate) const KEYS: [&str; 3] = ["k0", "k1", "k2"];

/// Longest a client waits for one answer before it gives up (its outcome then is unknown).
const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Every client operation of a run, in the order they were called.
#[derive(Clone, Default)]
pub(crate) struct History {
    ops: Arc<Mutex<Vec<Operation>>>,
}

impl History {
    fn call(&self, client: u64, key: &str, op: KvOp) -> usize {
        let mut ops = lock(&self.ops);
        ops.push(Operation {
            client,
            key: key.to_string(),
            op,
            call: nanos(now()),
            ret: None,
        });
        ops.len() - 1
    }

    fn ret(&self, index: usize, result: KvResult) {
        if let Some(op) = lock(&self.ops).get_mut(index) {
            op.ret = Some((nanos(now()).max(op.call + 1), result));
        }
    }

    /// A copy of every operation so far.
    pub(crate) fn operations(&self) -> Vec<Operation> {
        lock(&self.ops).clone()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One HTTP exchange with the router; None when no answer came in time.
pub(crate) async fn call(
    router: axum::Router,
    method: Method,
    uri: &str,
    body: Vec<u8>,
) -> Option<(StatusCode, Vec<u8>)> {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body))
        .ok()?;
    let exchange = async move {
        let response = router.oneshot(request).await.ok()?;
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .ok()?;
        Some((status, bytes.to_vec()))
    };
    tokio::time::timeout(OP_TIMEOUT, exchange).await.ok()?
}

/// The key-value workload of one client: puts of unique values and linearizable gets, with
/// short pauses, until `until`; then one final read of every key.
pub(crate) async fn kv_workload(
    client: u64,
    seed: u64,
    router: Arc<Mutex<Option<axum::Router>>>,
    history: History,
    until: Duration,
    final_read_at: Duration,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut n = 0u64;
    while now() < until {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        let Some(api) = lock(&router).clone() else {
            continue;
        };
        let key = KEYS[rng.random_range(0..KEYS.len())];
        if rng.random_bool(0.5) {
            n += 1;
            let value = format!("c{client}-{n}").into_bytes();
            let at = history.call(client, key, KvOp::Put(value.clone()));
            // Any answer but a success leaves the outcome unknown: the write may have
            // committed before the error (a leader change in flight, a timeout).
            if let Some((StatusCode::OK, _)) =
                call(api, Method::PUT, &format!("/v1/kv/{key}"), value).await
            {
                history.ret(at, KvResult::Ok);
            }
        } else {
            read(client, key, api, &history).await;
        }
    }
    while now() < final_read_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for key in KEYS {
        // A final read of each key, retried until one answers: what makes a lost write show.
        for _ in 0..20 {
            let Some(api) = lock(&router).clone() else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            if read(client, key, api, &history).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A linearizable get; true if it answered. A get that failed constrains nothing and is left
/// without a return.
async fn read(client: u64, key: &str, api: axum::Router, history: &History) -> bool {
    let at = history.call(client, key, KvOp::Get);
    match call(api, Method::GET, &format!("/v1/kv/{key}"), Vec::new()).await {
        Some((StatusCode::OK, value)) => {
            history.ret(at, KvResult::Value(Some(value)));
            true
        }
        Some((StatusCode::NOT_FOUND, body)) if body.windows(6).any(|w| w == b"no key") => {
            history.ret(at, KvResult::Value(None));
            true
        }
        _ => false,
    }
}

/// What the operator asks for once the cluster is up: a few VMs, some of which crash now and
/// then, retried until the cluster takes them.
pub(crate) async fn create_vms(router: Arc<Mutex<Option<axum::Router>>>, count: usize) {
    for i in 0..count {
        let mut command = vec!["sim-vm".to_string()];
        if i % 2 == 1 {
            command.push("crashy".into());
        }
        let body = serde_json::json!({
            "name": format!("vm{i}"),
            "driver": "process",
            "command": command,
            "vcpus": 1,
            "memory_mib": 512,
            "restart": "always",
        })
        .to_string()
        .into_bytes();
        loop {
            let api = lock(&router).clone();
            if let Some(api) = api {
                match call(api, Method::POST, "/v1/vms", body.clone()).await {
                    Some((s, _)) if s.is_success() || s == StatusCode::CONFLICT => break,
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
