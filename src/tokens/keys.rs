//! Which key signs, and which keys are published, across instances.
//!
//! Keys live in the database so every instance signs with the same key and
//! publishes the same JWKS. With `JWT_SECRET_KEY` the configured key signs
//! (its public half is recorded, so that after the operator changes it the
//! old key stays published); otherwise a key pair is generated at first
//! start and stored, sealed with `SECRET_KEY` when one is set.
//!
//! Rotation (`tollgate keys rotate`) makes a new key active at once: each
//! token request reads the active `kid` (one indexed row), so every instance
//! signs with the new key from its next token on. The retired key stays in
//! the JWKS for the token lifetime plus `ENTITLEMENT_TOKEN_LEEWAY_SECONDS`,
//! which covers verifiers' clock skew and a token signed while the rotation
//! was committing.
//!
//! Changing `JWT_SECRET_KEY` is rolled out instance by instance, so for a
//! while instances hold different keys. The newest wins: a configured key
//! not seen before becomes active at start-up, and a key once retired is
//! never made active again (otherwise every restart of an old or a new
//! instance would take the active key back). An instance that still signs
//! with a retired key (configured on it, or the generated key it used
//! before a configured one took over) keeps that key published while it
//! does, so its tokens verify everywhere until the rollout is done.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use secrecy::ExposeSecret;

use super::{configured_key, Jwk, Jwks, KeyError, Sealer, SigningKey, JWKS_MAX_AGE_SECONDS};
use crate::config::Config;
use crate::store::audit::Actor;
use crate::store::signing_keys::NewSigningKey;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The signing keys of this process. Cheap to clone.
#[derive(Clone)]
pub struct KeyRing {
    store: Store,
    configured: Option<Arc<SigningKey>>,
    sealer: Sealer,
    /// Generated keys opened so far, by `kid`: opening is done once per key.
    opened: Arc<Mutex<HashMap<String, Arc<SigningKey>>>>,
    /// The generated key this process signed with last: what it keeps
    /// using while another instance has made a configured key active that
    /// this one does not hold (a rolling change to `JWT_SECRET_KEY`).
    last: Arc<Mutex<Option<Arc<SigningKey>>>>,
    /// Seconds a retired key stays published: token lifetime plus leeway.
    window: i64,
    /// How often a retired key this process signs with is marked in use:
    /// within the leeway, so its tokens never outlive its publication.
    keep_published_every: i64,
    /// The retired key this process last marked in use, and when.
    kept_published: Arc<Mutex<Option<(String, i64)>>>,
    /// The configured key has been in the JWKS long enough for every
    /// verifier's cached copy to hold it (see [`KeyRing::signer`]).
    configured_known: Arc<AtomicBool>,
}

impl KeyRing {
    /// Makes sure a usable key is active (creating or recording one), and
    /// that this process can sign with it: a key it cannot open stops
    /// start-up rather than the first token request.
    pub async fn start(store: Store, config: &Config) -> Result<Self, KeyRingError> {
        let configured = match &config.jwt_secret_key {
            Some(raw) => Some(Arc::new(configured_key(raw.expose_secret())?.0)),
            None => None,
        };
        let ring = KeyRing {
            store,
            configured,
            sealer: Sealer::new(config.secret_key.as_ref().map(|s| s.expose_secret())),
            opened: Default::default(),
            last: Default::default(),
            window: signing_key_window(config),
            keep_published_every: (config.entitlement_token_leeway_seconds as i64).min(30),
            kept_published: Default::default(),
            configured_known: Default::default(),
        };
        // A few tries: another instance starting at the same moment may
        // win the race, and its key is then the one to use.
        for _ in 0..5 {
            let active = ring.store.active_signing_key().await?;
            let wanted = match (&ring.configured, &active) {
                (Some(key), Some(a)) if a.kid == key.kid() => None,
                (Some(key), _) => match ring.store.signing_key(key.kid()).await? {
                    // Retired: a newer key replaced it. This instance is
                    // behind in the rollout; it signs with its key, kept
                    // published, and leaves the active one alone.
                    Some(row) => {
                        tracing::warn!(
                            kid = %row.kid,
                            active = ?active.as_ref().map(|a| &a.kid),
                            retired_at = ?row.retired_at,
                            "JWT_SECRET_KEY is a signing key that a newer one replaced; this instance signs with it \
                             (kept in the JWKS while it does) but does not make it active again: give it the new key"
                        );
                        None
                    }
                    None => Some(NewSigningKey {
                        kid: key.kid().to_owned(),
                        source: "configured",
                        public_key: key.public_key(),
                        private_key: None,
                    }),
                },
                (None, Some(a)) if a.private_key.is_some() => None,
                // A configured key this process does not hold is active
                // (JWT_SECRET_KEY is being rolled out): while a generated key
                // is still published, sign with it rather than take over.
                (None, Some(_))
                    if ring.store.newest_published_generated_key(ring.window).await?.is_some() =>
                {
                    None
                }
                // No key yet, or a configured key long after the last
                // generated one (JWT_SECRET_KEY was unset everywhere): a new
                // generated key takes over.
                (None, _) => Some(ring.generate()?),
            };
            let Some(new) = wanted else {
                ring.signer().await?;
                return Ok(ring);
            };
            let replaces = active.as_ref().map(|a| a.kid.as_str());
            if ring.store.activate_signing_key(&new, replaces, ring.window, &Actor::System("tokens")).await? {
                tracing::info!(kid = %new.kid, source = new.source, retired = ?replaces, "entitlement token signing key activated");
            }
        }
        Err(KeyError("the active signing key kept changing during start-up; try again".to_owned()).into())
    }

    fn generate(&self) -> Result<NewSigningKey, KeyError> {
        let (key, pkcs8) = SigningKey::generate()?;
        Ok(NewSigningKey {
            kid: key.kid().to_owned(),
            source: "generated",
            public_key: key.public_key(),
            private_key: Some(self.sealer.seal(key.kid(), &pkcs8)?),
        })
    }

    /// The key to sign with now: the configured one, or the database's
    /// active key (read on every call, so a rotation is seen at once).
    pub async fn signer(&self) -> Result<Arc<SigningKey>, KeyRingError> {
        if let Some(key) = &self.configured {
            if let Some(previous) = self.before_configured_is_known(key).await? {
                self.keep_published(previous.kid()).await?;
                return Ok(previous);
            }
            // Retired or not (nothing happens while it is active).
            self.keep_published(key.kid()).await?;
            return Ok(key.clone());
        }
        let row = self.store.active_signing_key().await?.ok_or_else(|| {
            KeyError("no active signing key (was it removed from the database?)".to_owned())
        })?;
        let key = match row.private_key.as_deref() {
            Some(stored) => self.open(&row.kid, stored)?,
            None => {
                // The active key is configured (JWT_SECRET_KEY) on other
                // instances: sign with the generated key this process used,
                // or the newest one still published, and keep it published.
                let last = self.last.lock().expect("key cache").clone();
                let key = match last {
                    Some(key) => key,
                    None => {
                        let generated = self.store.newest_published_generated_key(self.window).await?;
                        let Some(g) = generated else {
                            return Err(KeyError(format!(
                                "the active signing key {} is configured (JWT_SECRET_KEY) on another instance and this one does not hold it",
                                row.kid
                            ))
                            .into());
                        };
                        self.open(&g.kid, g.private_key.as_deref().unwrap_or_default())?
                    }
                };
                tracing::warn!(active = %row.kid, signing = %key.kid(), "the active signing key is configured (JWT_SECRET_KEY) on other instances; signing with a generated key, kept published, until this one is reconfigured");
                self.keep_published(key.kid()).await?;
                key
            }
        };
        *self.last.lock().expect("key cache") = Some(key.clone());
        Ok(key)
    }

    /// A new `JWT_SECRET_KEY` is published the moment it is recorded, but
    /// verifiers may hold a JWKS fetched just before for up to
    /// [`JWKS_MAX_AGE_SECONDS`]. Until then, a generated key this process
    /// can open and that is still published signs instead (the usual case
    /// of moving from generated keys to a configured one). Moving from one
    /// configured key to another offers no such key: the new one signs at
    /// once, and verifiers refetch on its unknown `kid`.
    async fn before_configured_is_known(
        &self,
        key: &SigningKey,
    ) -> Result<Option<Arc<SigningKey>>, KeyRingError> {
        if self.configured_known.load(Ordering::Relaxed) {
            return Ok(None);
        }
        let now = crate::store::now_unix();
        let published_at = self.store.signing_key(key.kid()).await?.map_or(now, |row| row.created_at);
        if now - published_at >= JWKS_MAX_AGE_SECONDS as i64 {
            self.configured_known.store(true, Ordering::Relaxed);
            return Ok(None);
        }
        let Some(generated) = self.store.newest_published_generated_key(self.window).await? else {
            return Ok(None);
        };
        match self.open(&generated.kid, generated.private_key.as_deref().unwrap_or_default()) {
            Ok(previous) => Ok(Some(previous)),
            Err(e) => {
                tracing::debug!(error = %e, "no earlier key to sign with while the configured one becomes known");
                Ok(None)
            }
        }
    }

    /// A stored generated key, opened once per process.
    fn open(&self, kid: &str, stored: &str) -> Result<Arc<SigningKey>, KeyRingError> {
        if let Some(key) = self.opened.lock().expect("key cache").get(kid).cloned() {
            return Ok(key);
        }
        let key = SigningKey::from_pkcs8(&self.sealer.open(kid, stored)?)?;
        if key.kid() != kid {
            return Err(KeyError(format!("the stored signing key {kid} does not match its kid")).into());
        }
        let key = Arc::new(key);
        self.opened.lock().expect("key cache").insert(kid.to_owned(), key.clone());
        Ok(key)
    }

    /// Marks `kid` as still signing if it is retired, at most every
    /// `keep_published_every` seconds, so it stays in every instance's JWKS
    /// for as long as this process signs with it.
    async fn keep_published(&self, kid: &str) -> Result<(), KeyRingError> {
        let now = crate::store::now_unix();
        {
            let kept = self.kept_published.lock().expect("key cache");
            if let Some((k, at)) = kept.as_ref() {
                if k == kid && now - at < self.keep_published_every {
                    return Ok(());
                }
            }
        }
        if self.store.keep_signing_key_published(kid, &Actor::System("tokens")).await? {
            tracing::warn!(kid, "still signing with a retired key: kept in the JWKS");
        }
        *self.kept_published.lock().expect("key cache") = Some((kid.to_owned(), now));
        Ok(())
    }

    /// Every key that may have signed a token still alive, from the
    /// database, so all instances publish the same set.
    pub async fn jwks(&self) -> Result<Jwks, KeyRingError> {
        let mut keys: Vec<Jwk> = self
            .store
            .published_signing_keys(self.window)
            .await?
            .into_iter()
            .map(|row| Jwk::ed25519(&row.kid, &row.public_key))
            .collect();
        // Normally recorded at start-up; never leave out the key this
        // process signs with.
        if let Some(key) = &self.configured {
            if !keys.iter().any(|k| k.kid == key.kid()) {
                keys.insert(0, key.jwk());
            }
        }
        Ok(Jwks { keys })
    }
}

/// Seconds a retired key stays published: its tokens' lifetime plus leeway.
pub fn signing_key_window(config: &Config) -> i64 {
    (config.entitlement_token_ttl_seconds.saturating_add(config.entitlement_token_leeway_seconds)) as i64
}

/// What `tollgate keys rotate` reports.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub new_kid: String,
    pub retired_kid: Option<String>,
    /// Unix seconds after which the retired key leaves the JWKS.
    pub retired_published_until: Option<i64>,
}

/// Makes a new generated key active and retires the current one, with its
/// audit entry. Refused while `JWT_SECRET_KEY` is set: the configured key
/// is rotated by changing it.
pub async fn rotate(store: &Store, config: &Config, actor: &Actor) -> Result<Rotation, KeyRingError> {
    if config.jwt_secret_key.is_some() {
        return Err(KeyError(
            "JWT_SECRET_KEY is set: rotate by changing it (the previous key stays published until its tokens expire), \
             or unset it to use generated keys"
                .to_owned(),
        )
        .into());
    }
    let sealer = Sealer::new(config.secret_key.as_ref().map(|s| s.expose_secret()));
    let window = signing_key_window(config);
    let active = store.active_signing_key().await?;
    let (key, pkcs8) = SigningKey::generate()?;
    let new = NewSigningKey {
        kid: key.kid().to_owned(),
        source: "generated",
        public_key: key.public_key(),
        private_key: Some(sealer.seal(key.kid(), &pkcs8)?),
    };
    let replaces = active.as_ref().map(|a| a.kid.as_str());
    if !store.activate_signing_key(&new, replaces, window, actor).await? {
        return Err(
            KeyError("another rotation happened at the same moment; nothing was changed".to_owned()).into()
        );
    }
    Ok(Rotation {
        new_kid: new.kid,
        retired_kid: active.as_ref().map(|a| a.kid.clone()),
        retired_published_until: active.map(|_| crate::store::now_unix() + window),
    })
}
