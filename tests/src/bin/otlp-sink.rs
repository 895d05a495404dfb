//! An OTLP/HTTP receiver for benchmarks that costs the machine as little as a receiver can:
//! it accepts `POST /v1/traces`, `/v1/metrics` and `/v1/logs` with protobuf bodies, reads
//! them, answers each with an empty (valid) export response, and keeps only request and byte
//! counts, which it prints when its standard input closes. It decodes nothing, so a benchmark
//! measures what exporting costs the agents, not what parsing costs a collector.
//!
//!     otlp-sink PORT

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    bytes: AtomicU64,
}

fn main() {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u16>()) {
        Some(Ok(p)) => p,
        _ => {
            eprintln!("usage: otlp-sink PORT");
            std::process::exit(2);
        }
    };
    let counts = Arc::new(Counts::default());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = match rt.block_on(tokio::net::TcpListener::bind(("127.0.0.1", port))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("otlp-sink: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        }
    };
    let seen = counts.clone();
    let accept = move |body: axum::body::Bytes| {
        let seen = seen.clone();
        async move {
            seen.requests.fetch_add(1, Ordering::Relaxed);
            seen.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            (
                [(axum::http::header::CONTENT_TYPE, "application/x-protobuf")],
                Vec::<u8>::new(),
            )
        }
    };
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(accept.clone()))
        .route("/v1/metrics", axum::routing::post(accept.clone()))
        .route("/v1/logs", axum::routing::post(accept))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024));
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    println!(
        "{} requests, {} MB",
        counts.requests.load(Ordering::Relaxed),
        counts.bytes.load(Ordering::Relaxed) / 1_000_000
    );
}
