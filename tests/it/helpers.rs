//! Test harness: each test gets its own database and a real tollgate on
//! 127.0.0.1:0. The backend is SQLite, or PostgreSQL when
//! `TEST_DATABASE_URL` names a server (a fresh database per test, dropped
//! afterwards).

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tollgate::app::Server;
use tollgate::auth::{self, KeyMode, Scope};
use tollgate::store::audit::Actor;
use tollgate::store::{Store, StoreOptions};
use tollgate::Config;

pub fn manifest_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A database that exists for one test.
pub struct TestDb {
    pub url: String,
    admin_url: Option<String>,
    name: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new() -> Self {
        match std::env::var("TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) {
            Some(admin_url) => {
                let name = format!("tollgate_test_{}", ulid::Ulid::new().to_string().to_lowercase());
                let admin = Store::connect(&admin_url, &StoreOptions::default())
                    .await
                    .expect("TEST_DATABASE_URL must reach a PostgreSQL server");
                admin.execute_raw(&format!("CREATE DATABASE {name}")).await.expect("create test database");
                admin.close().await;
                let (base, query) = match admin_url.split_once('?') {
                    Some((b, q)) => (b.to_owned(), format!("?{q}")),
                    None => (admin_url.clone(), String::new()),
                };
                let base = base.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(base);
                TestDb { url: format!("{base}/{name}{query}"), admin_url: Some(admin_url), name, _dir: None }
            }
            None => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("tollgate.db").display());
                TestDb { url, admin_url: None, name: String::new(), _dir: Some(dir) }
            }
        }
    }

    /// The SQLite database file, if this is one.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        self.url.strip_prefix("sqlite://").filter(|_| !self.is_postgres()).map(PathBuf::from)
    }

    /// The same database for a second tollgate instance; dropping it
    /// leaves the database to the first handle.
    pub fn another_handle(&self) -> TestDb {
        TestDb { url: self.url.clone(), admin_url: None, name: String::new(), _dir: None }
    }

    pub fn is_postgres(&self) -> bool {
        self.admin_url.is_some()
    }

    /// A separate connection to the test database, as an operator would have.
    pub async fn store(&self) -> Store {
        Store::connect_and_migrate(&self.url, &StoreOptions::default())
            .await
            .expect("connect to test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(admin_url) = self.admin_url.clone() else { return };
        let name = std::mem::take(&mut self.name);
        // A failure that happens once in many runs is read in its database.
        if std::thread::panicking() && std::env::var_os("TEST_KEEP_FAILED_DB").is_some() {
            eprintln!("kept the failed test's database {name} (TEST_KEEP_FAILED_DB)");
            return;
        }
        // Drop runs inside the test's runtime; a fresh one on a plain thread
        // can block without upsetting it.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let admin = Store::connect(&admin_url, &StoreOptions::default()).await.ok()?;
                let _ = admin.execute_raw(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                admin.close().await;
                Some(())
            })
        })
        .join();
    }
}

pub fn test_config(db: &TestDb) -> Config {
    let mut config = Config::defaults();
    config.database_url = tollgate::config::ConnectionUrl::new(db.url.clone());
    config.catalog_path = manifest_path("tollgate.toml");
    config.database_max_connections = 5;
    config.shutdown_grace_seconds = 5;
    config
}

/// A running tollgate and what a test needs to talk to it.
pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    /// The server's own store handle (closing it simulates an outage).
    pub server_store: Store,
    pub shutdown: CancellationToken,
    pub handle: Option<JoinHandle<Result<(), tollgate::app::StartError>>>,
    pub read_key: String,
    pub write_key: String,
    pub admin_key: String,
    pub db: TestDb,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    let db = TestDb::new().await;
    spawn_on(db, adjust).await
}

pub async fn spawn_on(db: TestDb, adjust: impl FnOnce(&mut Config)) -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().unwrap();
    let mut config = test_config(&db);
    config.port = addr.port();
    adjust(&mut config);
    let shutdown = CancellationToken::new();
    let server = Server::build(config, shutdown.clone()).await.expect("server builds");
    let server_store = server.store().clone();
    let handle = tokio::spawn(server.serve(listener));

    let mut keys = Vec::new();
    for scope in [Scope::Read, Scope::Write, Scope::Admin] {
        keys.push(create_key(&server_store, scope).await);
    }
    let [read_key, write_key, admin_key]: [String; 3] = keys.try_into().unwrap();
    TestApp {
        base: format!("http://{addr}"),
        client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        server_store,
        shutdown,
        handle: Some(handle),
        read_key,
        write_key,
        admin_key,
        db,
    }
}

pub async fn create_key(store: &Store, scope: Scope) -> String {
    let key = auth::generate_key(KeyMode::Test);
    store
        .create_api_key(&format!("test {scope}"), scope, KeyMode::Test, &key, &Actor::Cli)
        .await
        .expect("create key");
    auth::reveal(&key).to_owned()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn get(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(key)
    }

    pub fn put_json(&self, path: &str, key: &str, body: serde_json::Value) -> reqwest::RequestBuilder {
        self.client.put(self.url(path)).bearer_auth(key).json(&body)
    }

    /// A read-scoped GET's JSON body, whatever its status.
    pub async fn read_json(&self, path: &str) -> serde_json::Value {
        let resp = self.get(path, &self.read_key).send().await.unwrap();
        resp.json().await.unwrap()
    }

    /// `GET /v1/customers/{external_id}`'s body, whatever its status.
    pub async fn customer_json(&self, external_id: &str) -> serde_json::Value {
        self.read_json(&format!("/v1/customers/{external_id}")).await
    }

    pub async fn upsert_customer(&self, external_id: &str, body: serde_json::Value) -> serde_json::Value {
        let resp = self
            .put_json(&format!("/v1/customers/{external_id}"), &self.write_key, body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "upsert failed: {}", resp.status());
        resp.json().await.unwrap()
    }

    /// Stops this tollgate and starts another on the same database (and
    /// whatever files sit beside it), on a new port, as after a restart.
    pub async fn restart(mut self, adjust: impl FnOnce(&mut Config)) -> TestApp {
        self.stop().await;
        let placeholder = TestDb { url: String::new(), admin_url: None, name: String::new(), _dir: None };
        let db = std::mem::replace(&mut self.db, placeholder);
        spawn_on(db, adjust).await
    }

    /// Cancels the shutdown token and waits for `run` to return.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(10), handle)
                .await
                .expect("server stops within 10s")
                .expect("server task")
                .expect("server exits cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Asserts the Stripe-style error shape and returns the error object.
pub async fn expect_error(resp: reqwest::Response, status: u16, kind: &str, code: &str) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "unexpected status");
    let request_id =
        resp.headers().get("request-id").expect("every response has Request-Id").to_str().unwrap().to_owned();
    assert!(
        resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"),
        "errors are JSON"
    );
    let body: serde_json::Value = resp.json().await.expect("error body is JSON");
    let error = body["error"].clone();
    assert_eq!(error["type"], kind, "error type in {body}");
    assert_eq!(error["code"], code, "error code in {body}");
    assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "message in {body}");
    assert_eq!(error["request_id"], request_id.as_str(), "request_id matches the header");
    error
}

/// Polls `check` until it returns `Some`, failing after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let found = eventually_or(deadline, check).await;
    found.unwrap_or_else(|| panic!("condition not met within {deadline:?}"))
}

/// [`eventually`] for a caller that explains a timeout itself: `None`
/// once the deadline has passed.
pub async fn eventually_or<T, F, Fut>(deadline: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if start.elapsed() >= deadline {
            return None;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// For tests that poll the API while events are applied, for longer than a
/// rate-limit burst lasts under load: the limits are off here (they have
/// their own tests).
pub fn unlimited(c: &mut tollgate::Config) {
    c.rate_limit_per_ip = 0;
    c.rate_limit_per_key = 0;
}

/// The hosted page's Pay button, as a person would press it.
pub async fn pay(session: &serde_json::Value, card: &str) {
    let page = session["url"].as_str().unwrap();
    // The page redirects to the shop's success URL, which is not ours to follow.
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = client.post(format!("{page}/pay")).form(&[("card_number", card)]).send().await.unwrap();
    assert_eq!(resp.status(), 303, "paid");
}

pub async fn emulator(app: &TestApp, path: &str, form: &[(&str, &str)]) -> serde_json::Value {
    let resp = app
        .client
        .post(app.url(&format!("/emulator/stripe{path}")))
        .bearer_auth("sk_test_local")
        .form(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{path}");
    resp.json().await.unwrap()
}

pub async fn emulator_get(app: &TestApp, path: &str) -> serde_json::Value {
    app.client
        .get(app.url(&format!("/emulator/stripe{path}")))
        .bearer_auth("sk_test_local")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
