//! What tollgate's HTTP stack costs per request, without sockets or a load
//! generator: a bare axum "hello" route and the entitlement check, each
//! driven through `tower::Service` on one thread. `tollgate loadtest
//! entitlements` gives SPEC 10's figure (sockets and client included); this
//! isolates the server's share so a profile of it is not drowned by the
//! client's. Run: `cargo bench --bench http_stack` (`-- N` requests).

use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

// The allocator the binary uses (src/main.rs): allocation is much of the cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = tollgate::config::Config::defaults();
        config.database_url =
            tollgate::config::ConnectionUrl::new(format!("sqlite://{}", dir.path().join("b.db").display()));
        config.stripe_emulator_state = Some("none".to_owned());
        config.rate_limit_per_ip = 0;
        config.rate_limit_per_key = 0;
        let server = tollgate::app::Server::build(config, CancellationToken::new()).await.expect("server");
        let store = server.store().clone();
        let key = tollgate::auth::generate_key(tollgate::auth::KeyMode::Test);
        store
            .create_api_key(
                "bench",
                tollgate::auth::Scope::Write,
                tollgate::auth::KeyMode::Test,
                &key,
                &tollgate::store::audit::Actor::Cli,
            )
            .await
            .expect("key");
        let authorization = format!("Bearer {}", tollgate::auth::reveal(&key));
        // The cache is kept exact by its sync task; without it, it never serves.
        let shutdown = CancellationToken::new();
        tokio::spawn(tollgate::store::cache::sync(store.clone(), shutdown.clone()));
        let app = server.router();
        let created = app
            .clone()
            .oneshot(
                Request::put("/v1/customers/u_bench")
                    .header("authorization", &authorization)
                    .header("content-type", "application/json")
                    .body(Body::from("{}"))
                    .expect("request"),
            )
            .await
            .expect("infallible");
        assert!(created.status().is_success(), "{}", created.status());
        let bare = axum::Router::new().route("/hello", axum::routing::get(|| async { "hello" }));

        let check = || {
            Request::get("/v1/customers/u_bench/entitlements/exports")
                .header("authorization", &authorization)
                .body(Body::empty())
                .expect("request")
        };
        let hello = || Request::get("/hello").body(Body::empty()).expect("request");
        // Warm up until the cache serves.
        for _ in 0..2000 {
            let r = app.clone().oneshot(check()).await.expect("infallible");
            assert_eq!(r.status(), 200);
        }
        let started = Instant::now();
        for _ in 0..n {
            let r = bare.clone().oneshot(hello()).await.expect("infallible");
            let _ = axum::body::to_bytes(r.into_body(), usize::MAX).await;
        }
        let bare_ns = started.elapsed().as_nanos() as f64 / f64::from(n);
        let started = Instant::now();
        for _ in 0..n {
            let r = app.clone().oneshot(check()).await.expect("infallible");
            let _ = axum::body::to_bytes(r.into_body(), usize::MAX).await;
        }
        let check_ns = started.elapsed().as_nanos() as f64 / f64::from(n);
        println!(
            "{n} requests each, one thread, no sockets: bare axum {bare_ns:.0} ns/request, \
             entitlement check {check_ns:.0} ns/request ({:.0} ns more)",
            check_ns - bare_ns
        );
        shutdown.cancel();
    });
}
