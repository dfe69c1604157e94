//! Entitlement tokens, verified the way an application would: with an
//! independent JWT library (`jsonwebtoken`, which shares no code with
//! tollgate's signer) against the JWKS fetched over HTTP.

use std::process::{Command, Output};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use proptest::prelude::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::billing_events::{buy, emulator_price, link_catalog, wait_entitlements};
use crate::helpers::*;

async fn issue(base: &str, client: &reqwest::Client, key: &str, external: &str) -> reqwest::Response {
    client
        .post(format!("{base}/v1/customers/{external}/entitlement-token"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
}

/// A token for `external`, checking the response's own fields agree with it.
async fn token_for(app: &TestApp, external: &str) -> Value {
    let resp = issue(&app.base, &app.client, &app.read_key, external).await;
    assert_eq!(resp.status(), 200, "a read key may issue tokens");
    resp.json().await.unwrap()
}

async fn jwks_of(base: &str) -> JwkSet {
    let resp = reqwest::get(format!("{base}/.well-known/jwks.json")).await.unwrap();
    assert_eq!(resp.status(), 200, "the JWKS needs no API key");
    let cache = resp.headers()["cache-control"].to_str().unwrap().to_owned();
    assert!(cache.contains("public") && cache.contains("max-age="), "cacheable: {cache}");
    resp.json().await.unwrap()
}

fn kids(jwks: &JwkSet) -> Vec<String> {
    jwks.keys.iter().map(|k| k.common.key_id.clone().unwrap()).collect()
}

/// What an application does: find the token's key in the JWKS by `kid`
/// and verify signature, algorithm, issuer, audience and expiry.
fn verify(
    token: &str,
    jwks: &JwkSet,
    issuer: &str,
    audience: Option<&str>,
) -> jsonwebtoken::errors::Result<Value> {
    let header = jsonwebtoken::decode_header(token)?;
    let kid = header.kid.ok_or(jsonwebtoken::errors::ErrorKind::InvalidToken)?;
    let jwk = jwks.find(&kid).ok_or(jsonwebtoken::errors::ErrorKind::InvalidKeyFormat)?;
    let key = DecodingKey::from_jwk(jwk)?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.leeway = 0;
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iss", "sub"]);
    match audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    Ok(jsonwebtoken::decode::<Value>(token, &key, &validation)?.claims)
}

fn now() -> i64 {
    tollgate::store::now_unix()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_carries_the_customers_entitlements_and_verifies_against_the_jwks() {
    let app = spawn_app_with(|c| {
        unlimited(c);
        c.entitlement_token_audience = Some("my-app".to_owned());
    })
    .await;
    // A Pro subscription (features, limits) and two card packs (credits).
    let pro = emulator_price(&app, "Pro", "2900", Some("month")).await;
    let pack = emulator_price(&app, "Card pack", "500", None).await;
    link_catalog(&app, &[("pro_monthly", &pro), ("card_pack_5", &pack)]).await;
    app.upsert_customer("u_tok", json!({ "email": "tok@example.com" })).await;
    let customer = emulator(&app, "/v1/customers", &[("metadata[tollgate_external_id]", "u_tok")]).await;
    let customer = customer["id"].as_str().unwrap();
    let session = emulator(
        &app,
        "/v1/checkout/sessions",
        &[
            ("mode", "subscription"),
            ("customer", customer),
            ("line_items[0][price]", &pro),
            ("success_url", "https://shop.example/ok"),
        ],
    )
    .await;
    pay(&session, "4242424242424242").await;
    // One purchase at a time, as a user would: the subscription's events
    // applied before the card packs' (concurrent first purchases of one
    // customer can race on PostgreSQL: see the branch report).
    wait_entitlements(&app, "u_tok", |e| {
        e["features"].as_array().is_some_and(|f| f.contains(&json!("api_access")))
    })
    .await;
    buy(&app, customer, &pack, "4242424242424242").await;
    let e = wait_entitlements(&app, "u_tok", |e| {
        e["balances"]["cards"] == 10
            && e["features"].as_array().is_some_and(|f| f.contains(&json!("api_access")))
    })
    .await;

    let before = now();
    let issued = token_for(&app, "u_tok").await;
    let token = issued["token"].as_str().unwrap();
    let jwks = jwks_of(&app.base).await;
    // PUBLIC_URL is the issuer; by default http://127.0.0.1:$PORT.
    let issuer = app.base.clone();
    let claims = verify(token, &jwks, &issuer, Some("my-app")).expect("the token verifies");

    assert_eq!(claims["sub"], "u_tok");
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], "my-app");
    let iat = claims["iat"].as_i64().unwrap();
    assert!((before..=now()).contains(&iat), "iat is now");
    assert_eq!(claims["exp"].as_i64().unwrap(), iat + 300, "the default lifetime is five minutes");
    assert_eq!(issued["expires_at"], claims["exp"]);
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    let granted = &claims["entitlements"];
    assert_eq!(granted["features"], e["features"]);
    assert_eq!(granted["limits"], e["limits"]);
    assert_eq!(granted["limits"]["projects"], 50);
    assert_eq!(granted["balances"], json!({ "cards": 10 }));
    assert_eq!(granted["version"], e["version"]);
    assert_eq!(issued["version"], e["version"]);

    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, Algorithm::EdDSA);
    assert_eq!(header.kid.as_deref(), issued["kid"].as_str());
    let jwk = serde_json::to_value(&jwks.keys[0]).unwrap();
    assert_eq!(
        (&jwk["kty"], &jwk["crv"], &jwk["alg"], &jwk["use"], &jwk["kid"]),
        (&json!("OKP"), &json!("Ed25519"), &json!("EdDSA"), &json!("sig"), &issued["kid"])
    );

    // Another audience, or another issuer, is refused.
    assert!(verify(token, &jwks, &issuer, Some("other-app")).is_err());
    assert!(verify(token, &jwks, "https://evil.example", Some("my-app")).is_err());

    // A second token is a new one (its own jti), with the same key.
    let again = token_for(&app, "u_tok").await;
    let claims2 = verify(again["token"].as_str().unwrap(), &jwks, &issuer, Some("my-app")).unwrap();
    assert_ne!(claims2["jti"], claims["jti"]);
    assert_eq!(again["kid"], issued["kid"]);
}

#[tokio::test]
async fn an_unknown_customer_gets_a_404_and_no_key_gets_a_401() {
    let app = spawn_app().await;
    let resp = issue(&app.base, &app.client, &app.read_key, "nobody").await;
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    let resp = app.client.post(app.url("/v1/customers/nobody/entitlement-token")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn an_expired_token_is_rejected() {
    let app = spawn_app_with(|c| c.entitlement_token_ttl_seconds = 1).await;
    app.upsert_customer("u_exp", json!({})).await;
    let issued = token_for(&app, "u_exp").await;
    let token = issued["token"].as_str().unwrap().to_owned();
    let jwks = jwks_of(&app.base).await;
    let issuer = app.base.clone();
    let claims = verify(&token, &jwks, &issuer, None).expect("fresh, it verifies");
    assert_eq!(claims["entitlements"], json!({ "features": [], "limits": {}, "balances": {}, "version": 0 }));
    let err =
        eventually(Duration::from_secs(10), || async { verify(&token, &jwks, &issuer, None).err() }).await;
    assert_eq!(err.kind(), &jsonwebtoken::errors::ErrorKind::ExpiredSignature);
    assert!(now() > issued["expires_at"].as_i64().unwrap());
}

fn tamper_payload(token: &str, change: impl FnOnce(&mut Value)) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    change(&mut claims);
    format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(claims.to_string()), parts[2])
}

#[tokio::test]
async fn a_tampered_token_is_rejected_whatever_byte_changes() {
    let app = spawn_app().await;
    app.upsert_customer("u_tamper", json!({})).await;
    let token = token_for(&app, "u_tamper").await["token"].as_str().unwrap().to_owned();
    let jwks = jwks_of(&app.base).await;
    let issuer = app.base.clone();
    verify(&token, &jwks, &issuer, None).expect("untouched, it verifies");

    // What an attacker would want: more credits, a longer life, someone else.
    let richer = tamper_payload(&token, |c| c["entitlements"]["balances"]["cards"] = json!(1000));
    assert_eq!(
        verify(&richer, &jwks, &issuer, None).unwrap_err().kind(),
        &jsonwebtoken::errors::ErrorKind::InvalidSignature
    );
    let longer = tamper_payload(&token, |c| c["exp"] = json!(c["exp"].as_i64().unwrap() + 86_400));
    assert!(verify(&longer, &jwks, &issuer, None).is_err());
    let other = tamper_payload(&token, |c| c["sub"] = json!("u_admin"));
    assert!(verify(&other, &jwks, &issuer, None).is_err());
    // A token claiming no signature at all.
    let parts: Vec<&str> = token.split('.').collect();
    let none_header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    assert!(verify(&format!("{none_header}.{}.", parts[1]), &jwks, &issuer, None).is_err());

    // Any byte, anywhere, replaced by any other: never accepted.
    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 1024,
        failure_persistence: None,
        ..Default::default()
    });
    runner
        .run(&(0..token.len(), any::<u8>()), |(at, byte)| {
            let mut bytes = token.as_bytes().to_vec();
            prop_assume!(bytes[at] != byte);
            bytes[at] = byte;
            let tampered = String::from_utf8_lossy(&bytes);
            prop_assert!(
                verify(&tampered, &jwks, &issuer, None).is_err(),
                "accepted with byte {at} = {byte}"
            );
            Ok(())
        })
        .unwrap();
}

/// The `tollgate` binary against the test's database, as an operator runs it.
fn tollgate(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("TOLLGATE_CATALOG", manifest_path("tollgate.toml"))
        .env("LOG_LEVEL", "warn")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tollgate")
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_rotation_new_tokens_use_the_new_key_and_the_old_key_leaves_once_its_tokens_expired() {
    const TTL: u64 = 4;
    let app = spawn_app_with(|c| {
        c.entitlement_token_ttl_seconds = TTL;
        c.entitlement_token_leeway_seconds = 0;
    })
    .await;
    app.upsert_customer("u_rot", json!({})).await;
    let issuer = app.base.clone();
    let old = token_for(&app, "u_rot").await;
    let old_token = old["token"].as_str().unwrap().to_owned();
    let old_kid = old["kid"].as_str().unwrap().to_owned();
    assert_eq!(kids(&jwks_of(&app.base).await), [old_kid.as_str()]);

    let ttl = TTL.to_string();
    let out = tollgate(
        &app.db,
        &["keys", "rotate"],
        &[("ENTITLEMENT_TOKEN_TTL_SECONDS", &ttl), ("ENTITLEMENT_TOKEN_LEEWAY_SECONDS", "0")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "rotate: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("retired {old_kid}")), "{stdout}");

    // The running server signs with the new key at once.
    let new = token_for(&app, "u_rot").await;
    let new_kid = new["kid"].as_str().unwrap().to_owned();
    assert_ne!(new_kid, old_kid);
    assert!(stdout.contains(&new_kid), "{stdout}");
    let jwks = jwks_of(&app.base).await;
    assert_eq!(kids(&jwks), [new_kid.clone(), old_kid.clone()], "both published, the active key first");
    verify(new["token"].as_str().unwrap(), &jwks, &issuer, None).expect("the new token verifies");
    assert_eq!(
        jsonwebtoken::decode_header(new["token"].as_str().unwrap()).unwrap().kid,
        Some(new_kid.clone())
    );

    // The old token still verifies for as long as it lives, and its key
    // is published at least that long.
    if now() < old["expires_at"].as_i64().unwrap() {
        verify(&old_token, &jwks, &issuer, None).expect("an old token verifies until it expires");
    }
    let gone = eventually(Duration::from_secs(3 * TTL), || async {
        let jwks = jwks_of(&app.base).await;
        (!kids(&jwks).contains(&old_kid)).then(|| (jwks, now()))
    })
    .await;
    let (jwks, left_at) = gone;
    assert!(left_at > old["expires_at"].as_i64().unwrap(), "not before its last token expired");
    assert_eq!(kids(&jwks), [new_kid.as_str()]);
    assert!(verify(&old_token, &jwks, &issuer, None).is_err());
    let out = tollgate(
        &app.db,
        &["keys", "list"],
        &[("ENTITLEMENT_TOKEN_TTL_SECONDS", &ttl), ("ENTITLEMENT_TOKEN_LEEWAY_SECONDS", "0")],
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && listed.contains(&new_kid) && listed.contains("active"), "{listed}");
    assert!(!listed.contains(&old_kid), "an unpublished key is not listed: {listed}");

    // The rotation is in the audit log, by the operator.
    let audit = app.server_store.list_audit_entries(&tollgate::store::Page::first(100)).await.unwrap();
    let rotated: Vec<_> = audit.data.iter().filter(|e| e.action == "signing_key.rotated").collect();
    assert_eq!(rotated.len(), 1, "{:?}", audit.data.iter().map(|e| &e.action).collect::<Vec<_>>());
    assert_eq!((rotated[0].actor.as_str(), rotated[0].object_id.as_str()), ("cli", new_kid.as_str()));
    assert!(rotated[0].data.contains(&old_kid));
}

/// Every key as if first published over a minute ago, longer than
/// verifiers cache the JWKS: a new configured key then signs.
async fn published_long_ago(app: &TestApp) {
    app.server_store.execute_raw("UPDATE signing_keys SET created_at = created_at - 120").await.unwrap();
}

/// A second tollgate on an existing test database.
struct Instance {
    base: String,
    shutdown: CancellationToken,
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_on_one_database_share_one_key_and_publish_the_same_jwks() {
    let db = TestDb::new().await;
    db.store().await.close().await;
    // Both start at once on a database with no key yet: one key wins.
    let mut listeners = Vec::new();
    let mut builds = Vec::new();
    for _ in 0..2 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = test_config(&db);
        config.port = listener.local_addr().unwrap().port();
        let shutdown = CancellationToken::new();
        builds.push(tollgate::app::Server::build(config, shutdown.clone()));
        listeners.push((listener, shutdown));
    }
    let servers = futures_util::future::join_all(builds).await;
    let mut instances = Vec::new();
    let mut store = None;
    for (server, (listener, shutdown)) in servers.into_iter().zip(listeners) {
        let server = server.expect("each instance starts");
        store.get_or_insert_with(|| server.store().clone());
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(server.serve(listener));
        instances.push(Instance { base, shutdown });
    }
    let store = store.unwrap();
    let key = create_key(&store, tollgate::auth::Scope::Read).await;
    let client = reqwest::Client::new();
    let resp = client
        .put(format!("{}/v1/customers/u_two", instances[0].base))
        .bearer_auth(create_key(&store, tollgate::auth::Scope::Write).await)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success());

    let a = jwks_of(&instances[0].base).await;
    let b = jwks_of(&instances[1].base).await;
    assert_eq!(kids(&a).len(), 1, "one key, though both started at once");
    assert_eq!(serde_json::to_value(&a).unwrap(), serde_json::to_value(&b).unwrap());
    for (signer, verifier) in [(0, 1), (1, 0)] {
        let resp = issue(&instances[signer].base, &client, &key, "u_two").await;
        assert_eq!(resp.status(), 200);
        let issued: Value = resp.json().await.unwrap();
        let jwks = jwks_of(&instances[verifier].base).await;
        // In production both would share PUBLIC_URL; here each is its own issuer.
        verify(issued["token"].as_str().unwrap(), &jwks, &instances[signer].base, None)
            .expect("a token from one instance verifies with the other's JWKS");
    }
    drop(instances);
    store.close().await;
}

/// Another tollgate on `db` with its own settings, serving until dropped.
async fn start_on(db: &TestDb, adjust: impl FnOnce(&mut tollgate::Config)) -> Result<Instance, String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = test_config(db);
    config.port = listener.local_addr().unwrap().port();
    adjust(&mut config);
    let shutdown = CancellationToken::new();
    let server = tollgate::app::Server::build(config, shutdown.clone()).await.map_err(|e| e.to_string())?;
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(server.serve(listener));
    Ok(Instance { base, shutdown })
}

/// RFC 8410's example Ed25519 key, as `openssl genpkey -algorithm ed25519` writes one.
const PEM: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----\n";
const PEM_PUBLIC_X: &str = "Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE";

fn secret(s: &str) -> Option<secrecy::SecretString> {
    Some(secrecy::SecretString::from(s.to_owned()))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_configured_key_signs_and_the_keys_it_replaced_stay_published() {
    let app = spawn_app().await;
    app.upsert_customer("u_conf", json!({})).await;
    let generated = token_for(&app, "u_conf").await;
    let generated_kid = generated["kid"].as_str().unwrap().to_owned();

    // An instance configured with a PEM file takes over signing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwt.pem");
    std::fs::write(&path, PEM).unwrap();
    let pem_instance =
        start_on(&app.db, |c| c.jwt_secret_key = secret(path.to_str().unwrap())).await.unwrap();
    // Once published for longer than verifiers cache the JWKS (see below
    // for the minute before).
    published_long_ago(&app).await;
    let resp = issue(&pem_instance.base, &app.client, &app.read_key, "u_conf").await;
    let configured: Value = resp.json().await.unwrap();
    let pem_kid = tollgate::tokens::thumbprint(PEM_PUBLIC_X);
    assert_eq!(configured["kid"], pem_kid.as_str(), "the kid is the key's RFC 7638 thumbprint");
    let jwks = jwks_of(&pem_instance.base).await;
    assert_eq!(kids(&jwks), [pem_kid.clone(), generated_kid.clone()]);
    assert_eq!(serde_json::to_value(&jwks).unwrap(), serde_json::to_value(jwks_of(&app.base).await).unwrap());
    verify(configured["token"].as_str().unwrap(), &jwks, &pem_instance.base, None).unwrap();
    verify(generated["token"].as_str().unwrap(), &jwks, &app.base, None)
        .expect("a token of the replaced key still verifies");
    // The instance without JWT_SECRET_KEY (mid-rollout) keeps signing with
    // the key it had, still published.
    let straggler = token_for(&app, "u_conf").await;
    assert_eq!(straggler["kid"], generated_kid.as_str());
    verify(straggler["token"].as_str().unwrap(), &jwks_of(&app.base).await, &app.base, None).unwrap();

    // The operator changes JWT_SECRET_KEY (here to a random secret): the
    // PEM key stays published beside the new one.
    let derived =
        start_on(&app.db, |c| c.jwt_secret_key = secret("4mB9zQ2xLr7Kp0vWc5Ty8Hn3Js6Fd1GeXa")).await.unwrap();
    published_long_ago(&app).await;
    let resp = issue(&derived.base, &app.client, &app.read_key, "u_conf").await;
    let from_secret: Value = resp.json().await.unwrap();
    let jwks = jwks_of(&derived.base).await;
    assert_eq!(kids(&jwks)[0], from_secret["kid"].as_str().unwrap());
    assert!(kids(&jwks).contains(&pem_kid) && kids(&jwks).contains(&generated_kid), "{:?}", kids(&jwks));
    verify(configured["token"].as_str().unwrap(), &jwks, &pem_instance.base, None).unwrap();
    verify(from_secret["token"].as_str().unwrap(), &jwks, &derived.base, None).unwrap();

    // `keys rotate` is for generated keys; a configured key is rotated by changing it.
    let out =
        tollgate(&app.db, &["keys", "rotate"], &[("JWT_SECRET_KEY", "4mB9zQ2xLr7Kp0vWc5Ty8Hn3Js6Fd1GeXa")]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JWT_SECRET_KEY is set"));
}

#[tokio::test(flavor = "multi_thread")]
async fn generated_keys_are_sealed_with_secret_key_and_a_wrong_one_stops_start_up() {
    const SECRET: &str = "q8Zr1vX0pL3mN7bK2yT5wE9uJ4hG6fD0sAx";
    let app = spawn_app_with(|c| c.secret_key = secret(SECRET)).await;
    let stored = app.server_store.active_signing_key().await.unwrap().unwrap();
    let private = stored.private_key.unwrap();
    assert!(private.starts_with("aead:v1:"), "sealed, not in clear: {}", &private[..12]);
    assert_eq!(stored.source, "generated");

    // Another instance with the same SECRET_KEY signs with the same key.
    let same = start_on(&app.db, |c| c.secret_key = secret(SECRET)).await.unwrap();
    app.upsert_customer("u_seal", json!({})).await;
    let resp = issue(&same.base, &app.client, &app.read_key, "u_seal").await;
    assert_eq!(resp.json::<Value>().await.unwrap()["kid"], stored.kid.as_str());

    let wrong = start_on(&app.db, |c| c.secret_key = secret("another-long-random-secret-0123456789"))
        .await
        .err()
        .expect("a key it cannot open stops start-up");
    assert!(wrong.contains("cannot be decrypted with this SECRET_KEY"), "{wrong}");
    let unset = start_on(&app.db, |c| c.secret_key = None).await.err().expect("no SECRET_KEY, no key");
    assert!(unset.contains("SECRET_KEY, which is not set"), "{unset}");

    // doctor says the same.
    let mut config = test_config(&app.db);
    config.secret_key = secret(SECRET);
    let report = tollgate::ops::doctor::run(&config).await;
    let check = report.checks.get("signing key").unwrap();
    assert_eq!(check.status, tollgate::ops::report::Status::Pass, "{report}");
    assert!(check.detail.contains("sealed with SECRET_KEY") && check.detail.contains(&stored.kid));
    config.secret_key = secret("another-long-random-secret-0123456789");
    let report = tollgate::ops::doctor::run(&config).await;
    assert_eq!(report.checks.get("signing key").unwrap().status, tollgate::ops::report::Status::Fail);
}

#[tokio::test]
async fn an_unreadable_or_invalid_jwt_secret_key_stops_serve_with_the_reason() {
    let db = TestDb::new().await;
    for (value, reason) in [
        ("/nonexistent/jwt.pem", "cannot read the key file"),
        ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "not an Ed25519 private key"),
        ("hunter2", "JWT_SECRET_KEY must be"),
    ] {
        let out = tollgate(&db, &["serve"], &[("JWT_SECRET_KEY", value), ("PORT", "0")]);
        assert_eq!(out.status.code(), Some(2), "refused: {value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(reason), "{value}: {stderr}");
        assert!(!stderr.contains("hunter2"), "a secret is never echoed: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rolling_a_jwt_secret_key_change_never_takes_the_active_key_back() {
    const OLD: &str = "Old7kQ2xLr9Kp0vWc5Ty8Hn3Js6Fd1GeXa";
    const NEW: &str = "New3mB9zQ2xLr7Kp0vWc5Ty8Hn3Js6Fd1G";
    let app = spawn_app().await;
    app.upsert_customer("u_roll", json!({})).await;
    let generated_kid = token_for(&app, "u_roll").await["kid"].as_str().unwrap().to_owned();
    let active = || async { app.server_store.active_signing_key().await.unwrap().unwrap().kid };
    let kid_from = |base: String| {
        let client = app.client.clone();
        let key = app.read_key.clone();
        async move {
            let resp = issue(&base, &client, &key, "u_roll").await;
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()
        }
    };

    let old_a = start_on(&app.db, |c| c.jwt_secret_key = secret(OLD)).await.unwrap();
    let old_kid = active().await;
    assert_ne!(old_kid, generated_kid);
    // Published at once, the configured key signs only once verifiers'
    // cached JWKS (a minute) hold it; the generated key signs until then.
    assert_eq!(kids(&jwks_of(&app.base).await)[0], old_kid);
    assert_eq!(kid_from(old_a.base.clone()).await["kid"], generated_kid.as_str());
    published_long_ago(&app).await;
    assert_eq!(kid_from(old_a.base.clone()).await["kid"], old_kid.as_str());
    // The new key is rolled out: the first new instance makes it active.
    let new_b = start_on(&app.db, |c| c.jwt_secret_key = secret(NEW)).await.unwrap();
    let new_kid = active().await;
    published_long_ago(&app).await;
    assert_eq!(kid_from(new_b.base.clone()).await["kid"], new_kid.as_str());

    // Old instances (re)starting mid-rollout, with the old key or with none,
    // leave the newest key active; they sign with their own key, which every
    // instance publishes.
    let old_c = start_on(&app.db, |c| {
        c.jwt_secret_key = secret(OLD);
        c.entitlement_token_leeway_seconds = 0;
    })
    .await
    .unwrap();
    let unconfigured = start_on(&app.db, |_| {}).await.unwrap();
    assert_eq!(active().await, new_kid, "the newest key stays active");
    let from_old = kid_from(old_c.base.clone()).await;
    let from_unconfigured = kid_from(unconfigured.base.clone()).await;
    assert_eq!(from_old["kid"], old_kid.as_str());
    assert_eq!(from_unconfigured["kid"], generated_kid.as_str());
    let jwks = jwks_of(&new_b.base).await;
    verify(from_old["token"].as_str().unwrap(), &jwks, &old_c.base, None).unwrap();
    verify(from_unconfigured["token"].as_str().unwrap(), &jwks, &unconfigured.base, None).unwrap();
    // A new instance restarting changes nothing either.
    let _new_d = start_on(&app.db, |c| c.jwt_secret_key = secret(NEW)).await.unwrap();
    assert_eq!(active().await, new_kid);
    let audit = app.server_store.list_audit_entries(&tollgate::store::Page::first(100)).await.unwrap();
    let activations: Vec<&str> = audit
        .data
        .iter()
        .filter(|e| e.action == "signing_key.rotated" || e.action == "signing_key.created")
        .map(|e| e.object_id.as_str())
        .collect();
    assert_eq!(activations, [new_kid.as_str(), old_kid.as_str(), generated_kid.as_str()], "newest first");

    // However long the rollout takes, the old key stays published while an
    // instance still signs with it.
    let sql = format!("UPDATE signing_keys SET retired_at = retired_at - 100000 WHERE kid = '{old_kid}'");
    app.server_store.execute_raw(&sql).await.unwrap();
    assert!(!kids(&jwks_of(&new_b.base).await).contains(&old_kid), "past its window, unpublished");
    let late = kid_from(old_c.base.clone()).await;
    let jwks = jwks_of(&new_b.base).await;
    assert!(kids(&jwks).contains(&old_kid), "published again while it signs: {:?}", kids(&jwks));
    verify(late["token"].as_str().unwrap(), &jwks, &old_c.base, None).unwrap();
    assert_eq!(active().await, new_kid, "and still not active");
}
