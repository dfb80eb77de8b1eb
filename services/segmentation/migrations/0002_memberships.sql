-- The read model segments are evaluated on: the latest snapshot of each
-- contact, as published on rapport.contacts.changes.v1.
CREATE TABLE contact_profiles (
    workspace_id UUID NOT NULL,
    contact_id TEXT NOT NULL,
    profile JSONB NOT NULL,
    -- update_time of the snapshot, so an older event never overwrites a newer one.
    version TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, contact_id)
);

-- Who is in which segment, since when.
CREATE TABLE memberships (
    workspace_id UUID NOT NULL,
    segment_id UUID NOT NULL,
    contact_id TEXT NOT NULL,
    entered_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, segment_id, contact_id)
);

CREATE INDEX memberships_contact ON memberships (workspace_id, contact_id);
