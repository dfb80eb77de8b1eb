-- New leads per day and first-touch source.
CREATE TABLE lead_counts (
    workspace_id UUID NOT NULL,
    day DATE NOT NULL,
    source TEXT NOT NULL,
    leads BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (workspace_id, day, source)
);
