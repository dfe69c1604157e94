-- The inbox claims waiting events oldest first, a batch at a time. With
-- only `provider_events_due`, each claim read every waiting event (bodies
-- included), sorted them all and checked each one's object: with 8,000
-- waiting a claim took ~45 ms, so a backlog slowed the inbox and grew
-- itself. Walked in this order, a claim stops once its batch is full; an
-- event whose retry is not due yet (a provider outage leaves many, older
-- than new arrivals) is passed over on the index entry alone, without
-- reading its row.
CREATE INDEX provider_events_waiting ON provider_events (provider_created, id, next_attempt_at)
    WHERE status IN ('received', 'failed');
-- A lease (taken and renewed per batch) changes only `locked_until`, which
-- no index covers: room left on each page lets it be a heap-only update,
-- without new entries in the table's five indexes.
ALTER TABLE provider_events SET (fillfactor = 80);
