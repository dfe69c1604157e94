-- A tollgate customer may own several provider customers of one provider:
-- a second Stripe customer made for the same user (by the Stripe dashboard, or
-- by a team's older integration) and one deleted on Stripe both keep their
-- link, so their late events still find their owner instead of adopting a
-- stranger. New checkouts use the oldest live link.
-- (SQLite drops a table constraint only by rebuilding the table.)
CREATE TABLE provider_customers_new (
    provider             TEXT NOT NULL,
    provider_customer_id TEXT NOT NULL,
    customer_id          TEXT NOT NULL REFERENCES customers (id),
    created_at           INTEGER NOT NULL,
    deleted_at           INTEGER,
    PRIMARY KEY (provider, provider_customer_id)
);
INSERT INTO provider_customers_new (provider, provider_customer_id, customer_id, created_at)
    SELECT provider, provider_customer_id, customer_id, created_at FROM provider_customers;
DROP TABLE provider_customers;
ALTER TABLE provider_customers_new RENAME TO provider_customers;
CREATE INDEX provider_customers_by_customer ON provider_customers (customer_id, provider, created_at);
