-- The inbox claims waiting events oldest first, a batch at a time: walked
-- in this order, a claim stops once its batch is full, instead of reading
-- and sorting every waiting event (a backlog made each claim slower). An
-- event whose retry is not due yet is passed over on the index entry.
CREATE INDEX provider_events_waiting ON provider_events (provider_created, id, next_attempt_at)
    WHERE status IN ('received', 'failed');
