//! Webhook endpoints declared in the config file, beside the catalog:
//!
//! ```toml
//! [webhook_endpoints.app]
//! url = "https://app.example.com/webhooks/tollgate"
//! events = ["order.paid", "order.refunded"]   # optional; all by default
//! description = "The shop"                    # optional
//! secret_env = "APP_WEBHOOK_SECRET"           # names the variable holding whsec_…
//! ```
//!
//! The secret is named, not written: the file belongs in version control,
//! the secret in the environment (a Kubernetes Secret, a systemd
//! credential). Declarations are checked by the API's rules and reconciled
//! at start-up (`Store::reconcile_declared_webhook_endpoints`); the key
//! (`app`) is what ties the stored endpoint to its declaration, so a
//! changed URL updates the endpoint instead of creating a second one.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::{signing, TargetPolicy};
use crate::ids::CatalogKey;
use crate::store::webhook_endpoints::DeclaredEndpoint;

/// The file's other sections belong to the catalog, which checks them.
#[derive(Deserialize)]
struct File {
    #[serde(default)]
    webhook_endpoints: BTreeMap<String, Raw>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    url: String,
    events: Option<Vec<String>>,
    description: Option<String>,
    secret_env: String,
}

/// The SPEC's minimum secret length, in bytes.
const MIN_SECRET_BYTES: usize = 24;

/// Reads and checks the declarations in `path`; `lookup` reads the
/// environment (a parameter so tests need not change the process's).
/// The error names the entry and what to fix.
pub async fn load(
    path: &Path,
    policy: TargetPolicy,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<DeclaredEndpoint>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse(&text, policy, lookup).await.map_err(|e| format!("{}: {e}", path.display()))
}

pub async fn parse(
    text: &str,
    policy: TargetPolicy,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Vec<DeclaredEndpoint>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.message().to_owned())?;
    let mut out = Vec::with_capacity(file.webhook_endpoints.len());
    for (key, raw) in file.webhook_endpoints {
        let entry = format!("[webhook_endpoints.{key}]");
        let key = CatalogKey::parse(&key).map_err(|e| format!("{entry}: {}", e.0))?;
        let url =
            super::check_endpoint_url(&raw.url, policy).await.map_err(|e| format!("{entry} url: {e}"))?;
        let events = super::normalize_events(raw.events).map_err(|e| format!("{entry} events: {e}"))?;
        let description = raw.description.map(|d| d.trim().to_owned()).filter(|d| !d.is_empty());
        if description.as_ref().is_some_and(|d| d.len() > 500 || d.chars().any(char::is_control)) {
            return Err(format!("{entry} description: at most 500 characters, no control characters."));
        }
        let name = raw.secret_env.trim();
        if name.is_empty() {
            return Err(format!(
                "{entry} secret_env: name the environment variable that holds the whsec_ secret."
            ));
        }
        let secret = lookup(name)
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("{entry}: the environment variable {name} (secret_env) is not set."))?;
        let strong = secret.starts_with(signing::SECRET_PREFIX)
            && signing::secret_key(&secret).is_ok_and(|k| k.len() >= MIN_SECRET_BYTES);
        if !strong {
            return Err(format!(
                "{entry}: {name} must hold whsec_ followed by the base64 of at least {MIN_SECRET_BYTES} random bytes \
                 (generate one with: echo whsec_$(head -c 32 /dev/urandom | base64))."
            ));
        }
        out.push(DeclaredEndpoint {
            key: key.as_str().to_owned(),
            url: url.to_string(),
            description,
            events,
            secret,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAX: TargetPolicy = TargetPolicy { strict: false };
    const STRICT: TargetPolicy = TargetPolicy { strict: true };
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwAAAAAAAAAAA=";

    fn env(name: &str) -> Option<String> {
        match name {
            "APP_SECRET" => Some(SECRET.to_owned()),
            "WEAK" => Some("whsec_c2hvcnQ=".to_owned()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_declaration_is_read_with_its_secret_from_the_environment() {
        let text = r#"
            [products.pro]
            name = "Pro"

            [webhook_endpoints.app]
            url = "http://127.0.0.1:9000/hook"
            events = ["order.paid", "invoice.paid", "order.paid"]
            description = " The shop "
            secret_env = "APP_SECRET"
        "#;
        let d = parse(text, LAX, env).await.unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].key, "app");
        assert_eq!(d[0].url, "http://127.0.0.1:9000/hook");
        assert_eq!(d[0].events, ["invoice.paid", "order.paid"]);
        assert_eq!(d[0].description.as_deref(), Some("The shop"));
        assert_eq!(d[0].secret, SECRET);
        assert!(!format!("{d:?}").contains(SECRET), "the secret is never printed");
        assert!(parse("[products.pro]\nname = \"Pro\"\n", LAX, env).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_declarations_are_refused_naming_the_entry() {
        let cases = [
            ("url = \"ftp://x/\"\nsecret_env = \"APP_SECRET\"", "url"),
            ("url = \"http://127.0.0.1/\"\nsecret_env = \"MISSING\"", "MISSING"),
            ("url = \"http://127.0.0.1/\"\nsecret_env = \"WEAK\"", "at least 24"),
            (
                "url = \"http://127.0.0.1/\"\nsecret_env = \"APP_SECRET\"\nevents = [\"order.shipped\"]",
                "events",
            ),
            (
                "url = \"http://127.0.0.1/\"\nsecret_env = \"APP_SECRET\"\nsecret = \"whsec_x\"",
                "unknown field",
            ),
            ("url = \"http://127.0.0.1/\"", "secret_env"),
        ];
        for (body, expected) in cases {
            let err = parse(&format!("[webhook_endpoints.app]\n{body}\n"), LAX, env).await.unwrap_err();
            assert!(err.contains(expected), "{body}: {err}");
        }
        let err = parse(
            "[webhook_endpoints.App]\nurl = \"http://127.0.0.1/\"\nsecret_env = \"APP_SECRET\"\n",
            LAX,
            env,
        )
        .await
        .unwrap_err();
        assert!(err.contains("[webhook_endpoints.App]"), "{err}");
        // Production's address rules apply as they do to the API.
        let err = parse(
            "[webhook_endpoints.app]\nurl = \"https://10.0.0.1/\"\nsecret_env = \"APP_SECRET\"\n",
            STRICT,
            env,
        )
        .await
        .unwrap_err();
        assert!(err.contains("private"), "{err}");
    }
}
