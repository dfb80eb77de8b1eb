-- Message ids accepted recently, so a client's retry is acknowledged and
-- dropped instead of counted twice. Rows older than the dedupe window are
-- removed by the service.
CREATE TABLE seen_messages (
    workspace_id UUID NOT NULL,
    message_id TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, message_id)
);

CREATE INDEX seen_messages_received_at ON seen_messages (received_at);
