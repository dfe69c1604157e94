-- Keys that sign entitlement tokens (JWTs), shared by every instance.
-- `active` is 1 on the one key that signs now and NULL on retired keys: a
-- unique column, so two instances starting at once cannot both create an
-- active key. A retired key stays published in the JWKS until every token
-- it signed has expired. Configured keys (JWT_SECRET_KEY) are recorded
-- with their public half only, so the JWKS can keep publishing one after
-- the operator changes it.
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    algorithm   TEXT NOT NULL CHECK (algorithm IN ('EdDSA')),
    source      TEXT NOT NULL CHECK (source IN ('generated', 'configured')),
    -- base64url of the 32-byte Ed25519 public key (the JWK's `x`).
    public_key  TEXT NOT NULL,
    -- Generated keys only: the PKCS#8 document, `aead:v1:…` (sealed with a
    -- key derived from SECRET_KEY) or `plain:…` when SECRET_KEY is unset.
    private_key TEXT,
    active      INTEGER UNIQUE CHECK (active = 1),
    created_at  INTEGER NOT NULL,
    retired_at  INTEGER,
    CHECK ((active IS NULL) = (retired_at IS NOT NULL))
);
