-- The newest event applied to each provider object (see billing/ordering.rs).
CREATE TABLE provider_object_watermarks (
    provider      TEXT NOT NULL,
    object_id     TEXT NOT NULL,
    created       BIGINT NOT NULL,
    lifecycle     BIGINT NOT NULL,
    progress      BIGINT NOT NULL,
    event_id      TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (provider, object_id)
);
