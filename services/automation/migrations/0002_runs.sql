-- One run per contact per journey: a contact enrols in a journey once.
-- A run is due when due_at has passed; the runner takes due runs with
-- FOR UPDATE SKIP LOCKED, so replicas share the work and a run is never
-- executed by two at once. The journey definition is copied at enrolment so
-- a run finishes on the version it started with.
CREATE TABLE runs (
    run_id UUID PRIMARY KEY,
    workspace_id UUID NOT NULL,
    journey_id UUID NOT NULL,
    journey_version INTEGER NOT NULL,
    definition BYTEA NOT NULL,
    contact_id TEXT NOT NULL,
    step_index INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'completed', 'failed')),
    due_at TIMESTAMPTZ,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT runs_once_per_contact UNIQUE (workspace_id, journey_id, contact_id)
);

CREATE INDEX runs_due ON runs (due_at) WHERE status = 'active';
