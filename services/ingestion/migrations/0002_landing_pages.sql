-- Hosted landing pages and their forms. Page and form ids are public (they
-- appear in URLs) and globally unique, so a request finds its workspace
-- through them.
CREATE TABLE landing_pages (
    page_id UUID PRIMARY KEY,
    form_id UUID NOT NULL UNIQUE,
    workspace_id UUID NOT NULL,
    name TEXT NOT NULL,
    definition BYTEA NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT landing_pages_name_unique UNIQUE (workspace_id, name)
);
