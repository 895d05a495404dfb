//! An OTLP receiver for benchmarks: accepts traces, metrics and logs over gRPC or
//! HTTP/protobuf on the address given, keeps only counts (it clears what it received every
//! 200 ms, so a long run does not fill memory), and prints the totals when its standard
//! input closes.
//!
//!     otlp-sink grpc|http/protobuf PORT

use std::io::Read;
use std::time::Duration;

use mock_collector::{MockServer, Protocol};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (protocol, port) = match (args.get(1).map(String::as_str), args.get(2)) {
        (Some("grpc"), Some(p)) => (Protocol::Grpc, p),
        (Some("http/protobuf"), Some(p)) => (Protocol::HttpBinary, p),
        _ => {
            eprintln!("usage: otlp-sink grpc|http/protobuf PORT");
            std::process::exit(2);
        }
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("otlp-sink: bad port {port}");
        std::process::exit(2);
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let server = match rt.block_on(MockServer::builder().protocol(protocol).port(port).start()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("otlp-sink: {e}");
            std::process::exit(1);
        }
    };
    let totals = rt.block_on(async {
        let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            let _ = done_tx.send(());
        });
        let mut totals = (0usize, 0usize, 0usize);
        let mut closed = false;
        loop {
            let (s, m, l) = server
                .with_collector_mut(|c| {
                    let counts = (c.spans().len(), c.metrics().len(), c.logs().len());
                    c.clear();
                    counts
                })
                .await;
            totals = (totals.0 + s, totals.1 + m, totals.2 + l);
            if closed {
                return totals;
            }
            tokio::select! {
                _ = &mut done => closed = true,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    });
    println!("spans {} metrics {} logs {}", totals.0, totals.1, totals.2);
}
