-- Lifecycle stages per workspace (absent: the defaults), and every stage
-- each contact has been in.
CREATE TABLE lifecycle_stages (
    workspace_id UUID PRIMARY KEY,
    stages TEXT[] NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE stage_changes (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    change_id UUID NOT NULL,
    stage TEXT NOT NULL,
    previous_stage TEXT NOT NULL,
    cause TEXT NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, contact_id, change_id)
);
