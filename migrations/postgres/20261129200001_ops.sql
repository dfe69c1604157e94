-- Operator runs (backups, restore drills) and how they ended, so `doctor`
-- can tell when the last backup was taken and the last drill passed.
CREATE TABLE ops_runs (
    id          TEXT COLLATE "C" PRIMARY KEY,
    kind        TEXT NOT NULL CHECK (kind IN ('backup', 'restore_drill')),
    started_at  BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    ok          BOOLEAN NOT NULL,
    report      TEXT NOT NULL
);
CREATE INDEX ops_runs_kind ON ops_runs (kind, finished_at);
