-- The newest event applied to each provider object (see billing/ordering.rs).
CREATE TABLE provider_object_watermarks (
    provider      TEXT NOT NULL,
    object_id     TEXT NOT NULL,
    created       INTEGER NOT NULL,
    lifecycle     INTEGER NOT NULL,
    progress      INTEGER NOT NULL,
    event_id      TEXT NOT NULL,
    PRIMARY KEY (provider, object_id)
);
