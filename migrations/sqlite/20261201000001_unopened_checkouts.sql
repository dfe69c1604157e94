-- Checkouts recorded but never opened at the provider (`open`, no provider
-- session): what the abandoned-checkout sweeper scans every minute.
CREATE INDEX checkout_sessions_unopened ON checkout_sessions (updated_at)
    WHERE status = 'open' AND provider_session_id IS NULL;
