//! Admission: bad tokens are refused with a clear error and the refused node never appears;
//! strangers without a cluster certificate cannot gossip; garbage on the UDP port changes
//! nothing.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use blx_membership::token::JoinToken;
use blx_tests::{Agent, Cluster, wait_until};

fn refused(cluster: &Cluster, name: &str, token: &str, expect: &str) {
    let out = cluster.try_join(name, token);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "join of {name} with a bad token succeeded"
    );
    assert!(
        stderr.contains(expect),
        "join of {name}: expected {expect:?} in stderr, got:\n{stderr}"
    );
    let members = cluster.agents[0].members().expect("n1 answers");
    assert!(
        members.iter().all(|m| m.name != name),
        "{name} shows up as a member: {members:?}"
    );
}

#[test]
fn expired_revoked_forged_garbled_and_foreign_tokens_are_refused() {
    let cluster = Cluster::bootstrap();
    wait_until(Duration::from_secs(20), "n1 answers", || {
        cluster.agents[0].members().is_some()
    });
    let n1 = &cluster.agents[0];

    tracing::info!("--- garbled");
    refused(
        &cluster,
        "garbled",
        "blx1.this-is-not-a-token",
        "malformed join token",
    );
    let mut cut = cluster.token.clone();
    cut.truncate(cut.len() - 5);
    refused(&cluster, "cut", &cut, "malformed join token");

    tracing::info!("--- forged: right cluster, made-up secret");
    let mut forged: JoinToken = cluster.token.parse().unwrap();
    forged.secret = [7; 32];
    refused(&cluster, "forged", &forged.to_string(), "did not issue it");

    tracing::info!("--- revoked");
    let token = n1.token("1h");
    let id = token.parse::<JoinToken>().unwrap().id.to_string();
    let out = n1.cli(&["token", "revoke", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refused(&cluster, "revoked", &token, "revoked");

    tracing::info!("--- expired");
    let token = n1.token("1s");
    let id = token.parse::<JoinToken>().unwrap().id.to_string();
    wait_until(Duration::from_secs(10), "the 1s token expires", || {
        let out = n1.cli(&["token", "list"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.starts_with(&id) && l.contains("expired"))
    });
    refused(&cluster, "expired", &token, "expired");

    tracing::info!("--- a token of another cluster: the CA pin fails");
    let other = Cluster::bootstrap();
    refused(&cluster, "foreign", &other.token, "different cluster");

    tracing::info!("--- bad input to the token API");
    let out = n1.cli(&["token", "revoke", "xyz"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("16 hex digits"));
    let out = n1.cli(&["token", "create", "--ttl", "0s"]);
    assert!(!out.status.success());
    let out = n1.cli(&["token", "revoke", "0000000000000000"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    tracing::info!("--- shell completions are generated");
    let out = std::process::Command::new(blx_tests::blx_bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("token"));

    tracing::info!("--- the good token still works after all that");
    let mut cluster = cluster;
    cluster.join();
    cluster.wait_alive(2, Duration::from_secs(60));
}

/// Accepts any server certificate: the stranger wants to see whether the agent accepts it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Dials `addr` on the member ALPN with an optional client certificate; returns whether the
/// connection survived long enough to carry a datagram, after sending one.
async fn stranger_dial(
    addr: SocketAddr,
    cert: Option<(rustls::pki_types::CertificateDer<'static>, Vec<u8>)>,
) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut tls = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![cert],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![b"blx/1".to_vec()];
    let client =
        blx_membership::quic::client_config(tls, &blx_membership::quic::CidRng::new([0; 32]))
            .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(client);
    let conn = endpoint
        .connect(addr, "node.blx")
        .unwrap()
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    // A garbage SWIM announce; then see whether the agent keeps the connection.
    let _ = conn.send_datagram(vec![1u8, 0, 1, 2, 3].into());
    match tokio::time::timeout(Duration::from_secs(3), conn.closed()).await {
        Ok(reason) => Err(format!("closed: {reason}")),
        Err(_) => Ok(()),
    }
}

#[test]
fn strangers_cannot_gossip_and_garbage_changes_nothing() {
    let mut cluster = Cluster::bootstrap();
    cluster.join();
    cluster.wait_alive(2, Duration::from_secs(60));
    let n1: &Agent = &cluster.agents[0];
    let before: Vec<(String, String, u64)> = n1
        .members()
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.state, m.generation))
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    tracing::info!("--- a self-signed certificate fails the handshake");
    let key = rcgen::KeyPair::generate().unwrap();
    let self_signed = rcgen::CertificateParams::new(vec!["node.blx".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let result = rt.block_on(stranger_dial(
        n1.gossip,
        Some((self_signed.der().clone(), key.serialize_der())),
    ));
    assert!(
        result.is_err(),
        "a self-signed peer kept a member connection"
    );

    tracing::info!("--- a certificate from another CA fails too");
    let rogue_ca = blx_membership::tls::ClusterCa::generate("rogue", [9; 32]).unwrap();
    let rogue = rogue_ca
        .issue_node(
            blx_membership::NodeId([9; 8]),
            [8; 32],
            blx_membership::tls::Validity::starting(
                1_700_000_000,
                std::time::Duration::from_secs(3600),
            ),
        )
        .unwrap();
    let result = rt.block_on(stranger_dial(
        n1.gossip,
        Some((rogue.cert_der.clone(), rogue.key_der.clone())),
    ));
    assert!(
        result.is_err(),
        "a peer of another CA kept a member connection"
    );

    tracing::info!("--- no certificate on the member protocol: closed at once");
    let result = rt.block_on(stranger_dial(n1.gossip, None));
    assert!(
        result.is_err(),
        "a peer without a certificate kept a member connection"
    );

    tracing::info!("--- random bytes on the UDP port");
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut seed = 0x9e3779b97f4a7c15u64;
    for i in 0..2000usize {
        let len = 1 + (i * 37) % 1400;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()[0]
            })
            .collect();
        let _ = sock.send_to(&bytes, n1.gossip);
    }

    tracing::info!("--- the cluster is exactly as it was");
    std::thread::sleep(Duration::from_secs(2)); // let the probes of a full period run
    let after: Vec<(String, String, u64)> = n1
        .members()
        .unwrap()
        .into_iter()
        .map(|m| (m.id, m.state, m.generation))
        .collect();
    assert_eq!(before, after);
    cluster.wait_alive(2, Duration::from_secs(5));
}
