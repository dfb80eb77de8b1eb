-- Journey definitions: the Journey message kept whole, name unique per workspace.
CREATE TABLE journeys (
    workspace_id UUID NOT NULL,
    id UUID NOT NULL,
    name TEXT NOT NULL,
    definition BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id),
    CONSTRAINT journeys_name_unique UNIQUE (workspace_id, name)
);
