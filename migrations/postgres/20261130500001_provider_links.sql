-- A tollgate customer may own several provider customers of one provider:
-- a second Stripe customer made for the same user (by the Stripe dashboard, or
-- by a team's older integration) and one deleted on Stripe both keep their
-- link, so their late events still find their owner instead of adopting a
-- stranger. New checkouts use the oldest live link.
ALTER TABLE provider_customers DROP CONSTRAINT IF EXISTS provider_customers_customer_id_provider_key;
ALTER TABLE provider_customers ADD COLUMN deleted_at BIGINT;
CREATE INDEX provider_customers_by_customer ON provider_customers (customer_id, provider, created_at);
