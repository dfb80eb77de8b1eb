-- A run whose contact was merged into another one is stopped as 'cancelled'
-- (rapport.contacts.changes.v1, CHANGE_TYPE_MERGED): it is never due again,
-- and its row keeps the merged-away id from being enrolled in that journey
-- again. The CHECK is the one 0002 declared on the column, which Postgres
-- named runs_status_check.
ALTER TABLE runs DROP CONSTRAINT runs_status_check;
ALTER TABLE runs ADD CONSTRAINT runs_status_check
    CHECK (status IN ('active', 'completed', 'failed', 'cancelled'));
