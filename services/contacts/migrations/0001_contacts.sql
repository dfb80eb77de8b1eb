-- One row per person per workspace. Later migrations add identities,
-- custom-field definitions, stage history, consent, orders and notes.
CREATE TABLE contacts (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    -- Normalised (trimmed, lower-case); unique per workspace.
    email TEXT NOT NULL,
    phone TEXT NOT NULL DEFAULT '',
    first_name TEXT NOT NULL DEFAULT '',
    last_name TEXT NOT NULL DEFAULT '',
    company TEXT NOT NULL DEFAULT '',
    lifecycle_stage TEXT NOT NULL DEFAULT 'lead',
    tags TEXT[] NOT NULL DEFAULT '{}',
    attributes JSONB NOT NULL DEFAULT '{}',
    source TEXT NOT NULL DEFAULT '',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, contact_id),
    CONSTRAINT contacts_email_unique UNIQUE (workspace_id, email)
);

CREATE INDEX contacts_stage ON contacts (workspace_id, lifecycle_stage, contact_id DESC);

-- Results of UpsertContact by request id, so a retried call returns the
-- first answer without writing again.
CREATE TABLE upsert_requests (
    workspace_id UUID NOT NULL,
    request_id TEXT NOT NULL,
    contact_id UUID NOT NULL,
    created BOOLEAN NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, request_id)
);
