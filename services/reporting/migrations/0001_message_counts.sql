-- Event ids already counted, so a redelivered event never counts twice.
CREATE TABLE processed_events (
    workspace_id UUID NOT NULL,
    event_id TEXT NOT NULL,
    processed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, event_id)
);

-- Message lifecycle counts per day, journey and template.
CREATE TABLE message_counts (
    workspace_id UUID NOT NULL,
    day DATE NOT NULL,
    journey_id TEXT NOT NULL,
    template_id TEXT NOT NULL,
    sent BIGINT NOT NULL DEFAULT 0,
    delivered BIGINT NOT NULL DEFAULT 0,
    opened BIGINT NOT NULL DEFAULT 0,
    clicked BIGINT NOT NULL DEFAULT 0,
    bounced BIGINT NOT NULL DEFAULT 0,
    unsubscribed BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, day, journey_id, template_id)
);
