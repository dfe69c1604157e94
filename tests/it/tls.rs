//! Native TLS (`TLS_CERT`, `TLS_KEY`), with a self-signed certificate made
//! for each test run.

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tollgate::app::{Server, StartError};

use crate::helpers::*;

struct TestCert {
    pem: String,
    cert: PathBuf,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

fn self_signed() -> TestCert {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    TestCert { pem: made.cert.pem(), cert, key, _dir: dir }
}

#[tokio::test]
async fn tollgate_serves_https_with_its_own_certificate() {
    let tls = self_signed();
    let app = spawn_app_with(|c| {
        c.tls_cert = Some(tls.cert.clone());
        c.tls_key = Some(tls.key.clone());
    })
    .await;
    let addr: std::net::SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();

    // A client that stalls in its handshake holds up nobody.
    let _stalled = tokio::net::TcpStream::connect(addr).await.unwrap();

    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(tls.pem.as_bytes()).unwrap())
        .resolve("localhost", addr)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", addr.port());
    let live = client.get(format!("{base}/livez")).send().await.unwrap();
    assert_eq!(live.status(), 200);
    assert!(live.headers().contains_key("strict-transport-security"), "served over https, so HSTS is on");
    let products = client.get(format!("{base}/v1/products")).bearer_auth(&app.read_key).send().await.unwrap();
    assert_eq!(products.status(), 200, "the API over https, limits and all");
    assert!(products.headers().contains_key("ratelimit-limit"));

    // Plain HTTP to the TLS port gets no HTTP answer.
    assert!(app.client.get(format!("http://{addr}/livez")).send().await.is_err());
    // A client that does not trust the certificate refuses it.
    assert!(reqwest::get(format!("https://{addr}/livez")).await.is_err());

    // Graceful shutdown works the same over TLS: it stops, and stops accepting.
    let mut app = app;
    app.stop().await;
    assert!(client.get(format!("{base}/livez")).send().await.is_err());
}

#[tokio::test]
async fn unusable_certificate_files_stop_start_up_with_the_reason() {
    let tls = self_signed();
    let db = TestDb::new().await;
    let build = |cert: PathBuf, key: PathBuf| {
        let mut config = test_config(&db);
        config.tls_cert = Some(cert);
        config.tls_key = Some(key);
        Server::build(config, CancellationToken::new())
    };
    let message = |result: Result<Server, StartError>| match result {
        Err(e @ StartError::Tls(_)) => e.to_string(),
        Err(other) => panic!("expected a TLS error, got {other}"),
        Ok(_) => panic!("expected a TLS error, but the server built"),
    };

    let missing = message(build(PathBuf::from("/nonexistent/cert.pem"), tls.key.clone()).await);
    assert!(missing.contains("TLS_CERT /nonexistent/cert.pem"), "{missing}");
    // The key where the certificate should be, and the other way round.
    let swapped = message(build(tls.key.clone(), tls.cert.clone()).await);
    assert!(swapped.contains("TLS_CERT") || swapped.contains("TLS_KEY"), "{swapped}");
    let other_key = self_signed();
    let mismatch = message(build(tls.cert.clone(), other_key.key.clone()).await);
    assert!(mismatch.contains("do not make a usable pair"), "{mismatch}");
    assert!(!mismatch.contains("PRIVATE KEY"), "the key never appears in messages");
}
