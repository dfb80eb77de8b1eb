-- Every message Rapport sent (or refused to send), one row per idempotency key.
CREATE TABLE sends (
    workspace_id UUID NOT NULL,
    message_id UUID NOT NULL,
    idempotency_key TEXT NOT NULL,
    contact_id TEXT NOT NULL,
    template_id UUID NOT NULL,
    journey_id TEXT NOT NULL DEFAULT '',
    channel TEXT NOT NULL,
    recipient TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('sent', 'suppressed')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, message_id),
    CONSTRAINT sends_idempotency_key_unique UNIQUE (workspace_id, idempotency_key)
);

-- Contacts who must not get messages on a channel, and why.
CREATE TABLE suppressions (
    workspace_id UUID NOT NULL,
    contact_id TEXT NOT NULL,
    channel TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, contact_id, channel)
);

-- Ingestion events already turned into message events.
CREATE TABLE processed_events (
    workspace_id UUID NOT NULL,
    event_id TEXT NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, event_id)
);
