-- The inbox claims waiting events oldest first, a batch at a time: walked
-- in this order, a claim stops once its batch is full, instead of reading
-- and sorting every waiting event (a backlog made each claim slower).
CREATE INDEX provider_events_waiting ON provider_events (provider_created, id)
    WHERE status IN ('received', 'failed');
