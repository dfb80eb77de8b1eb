-- The W3C traceparent of the work that enrolled the contact, so the steps a
-- run executes later stay in the same trace.
ALTER TABLE runs ADD COLUMN trace_parent TEXT NOT NULL DEFAULT '';
