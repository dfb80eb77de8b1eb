-- Marketing consent per channel: the current state on the contact, and every
-- change in consent_changes.
ALTER TABLE contacts
    ADD COLUMN email_consent TEXT NOT NULL DEFAULT 'unspecified'
        CHECK (email_consent IN ('unspecified', 'pending', 'subscribed', 'unsubscribed')),
    ADD COLUMN email_consent_reason TEXT NOT NULL DEFAULT '',
    ADD COLUMN email_consent_at TIMESTAMPTZ,
    ADD COLUMN sms_consent TEXT NOT NULL DEFAULT 'unspecified'
        CHECK (sms_consent IN ('unspecified', 'pending', 'subscribed', 'unsubscribed')),
    ADD COLUMN sms_consent_reason TEXT NOT NULL DEFAULT '',
    ADD COLUMN sms_consent_at TIMESTAMPTZ;

CREATE TABLE consent_changes (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    channel TEXT NOT NULL CHECK (channel IN ('email', 'sms')),
    status TEXT NOT NULL,
    previous_status TEXT NOT NULL,
    reason TEXT NOT NULL,
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX consent_changes_contact ON consent_changes (workspace_id, contact_id, changed_at);
