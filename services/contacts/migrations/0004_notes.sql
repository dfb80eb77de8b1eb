-- Interactions with a contact: support tickets, sales calls, objections.
CREATE TABLE notes (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    note_id UUID NOT NULL,
    note_type TEXT NOT NULL,
    body TEXT NOT NULL,
    author TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    request_id TEXT,
    PRIMARY KEY (workspace_id, note_id),
    CONSTRAINT notes_request_unique UNIQUE (workspace_id, request_id)
);

CREATE INDEX notes_contact ON notes (workspace_id, contact_id, note_id DESC);
