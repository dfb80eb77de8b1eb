-- Intent rules: the IntentRule message kept whole; the signal is the name.
CREATE TABLE intent_rules (
    workspace_id UUID NOT NULL,
    id UUID NOT NULL,
    name TEXT NOT NULL,
    definition BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, id),
    CONSTRAINT intent_rules_name_unique UNIQUE (workspace_id, name)
);

-- When each visitor (user or anonymous id) was last seen on a page, for
-- return-visit rules.
CREATE TABLE visits (
    workspace_id UUID NOT NULL,
    visitor_id TEXT NOT NULL,
    last_seen_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, visitor_id)
);
