-- The whole profile: more standard fields, owner, score, custom fields,
-- touches, company link and order aggregates on the contact; identities,
-- merges, erasures, custom-field definitions, score log, companies, orders
-- and the timeline beside it.

-- Emails are identities now (one owner per address, in `identities`, which
-- is also where lookups by email go); a contact may have none (anonymous, or
-- known by an external id).
ALTER TABLE contacts DROP CONSTRAINT contacts_email_unique;
ALTER TABLE contacts
    ADD COLUMN job_title TEXT NOT NULL DEFAULT '',
    ADD COLUMN time_zone TEXT NOT NULL DEFAULT '',
    ADD COLUMN locale TEXT NOT NULL DEFAULT '',
    ADD COLUMN country TEXT NOT NULL DEFAULT '',
    ADD COLUMN owner_id TEXT NOT NULL DEFAULT '',
    ADD COLUMN score BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN custom_fields JSONB NOT NULL DEFAULT '{}',
    ADD COLUMN first_touch JSONB,
    ADD COLUMN last_touch JSONB,
    ADD COLUMN company_id UUID,
    ADD COLUMN order_count BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN first_purchase_at TIMESTAMPTZ,
    ADD COLUMN last_purchase_at TIMESTAMPTZ,
    ADD COLUMN spend JSONB NOT NULL DEFAULT '[]';

CREATE INDEX contacts_owner ON contacts (workspace_id, owner_id, contact_id DESC) WHERE owner_id <> '';
CREATE INDEX contacts_company ON contacts (workspace_id, company_id) WHERE company_id IS NOT NULL;
-- Filters on any custom field value (containment) and on tags.
CREATE INDEX contacts_custom_fields ON contacts USING GIN (custom_fields jsonb_path_ops);
CREATE INDEX contacts_tags ON contacts USING GIN (tags);

-- Every way a contact is recognised. kind: email, phone, external
-- (`system:id`), anonymous. One contact per identity.
CREATE TABLE identities (
    workspace_id UUID NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('email', 'phone', 'external', 'anonymous')),
    value TEXT NOT NULL,
    contact_id UUID NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, kind, value)
);
CREATE INDEX identities_contact ON identities (workspace_id, contact_id);

INSERT INTO identities (workspace_id, kind, value, contact_id, created_at)
SELECT workspace_id, 'email', email, contact_id, created_at FROM contacts WHERE email <> ''
ON CONFLICT DO NOTHING;
INSERT INTO identities (workspace_id, kind, value, contact_id, created_at)
SELECT workspace_id, 'phone', phone, contact_id, created_at FROM contacts WHERE phone <> ''
ON CONFLICT DO NOTHING;

-- A merged-away id resolves to its survivor.
CREATE TABLE merged_contacts (
    workspace_id UUID NOT NULL,
    merged_id UUID NOT NULL,
    survivor_id UUID NOT NULL,
    merged_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, merged_id)
);
CREATE INDEX merged_contacts_survivor ON merged_contacts (workspace_id, survivor_id);

-- Erased contacts: the id and the time only, so late events about them
-- recreate nothing.
CREATE TABLE erased_contacts (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    erased_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, contact_id)
);

CREATE TABLE custom_fields (
    workspace_id UUID NOT NULL,
    key TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    type TEXT NOT NULL CHECK (type IN ('string', 'number', 'boolean', 'date', 'datetime', 'enum', 'multi_enum')),
    options TEXT[] NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, key)
);

CREATE TABLE score_changes (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    change_id UUID NOT NULL,
    delta BIGINT NOT NULL,
    score BIGINT NOT NULL,
    reason TEXT NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    changed_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, change_id)
);
CREATE INDEX score_changes_contact ON score_changes (workspace_id, contact_id, change_id DESC);
CREATE UNIQUE INDEX score_changes_request ON score_changes (workspace_id, request_id) WHERE request_id <> '';

CREATE TABLE companies (
    workspace_id UUID NOT NULL,
    company_id UUID NOT NULL,
    name TEXT NOT NULL,
    domain TEXT NOT NULL DEFAULT '',
    industry TEXT NOT NULL DEFAULT '',
    employee_count BIGINT NOT NULL DEFAULT 0,
    attributes JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, company_id)
);
CREATE UNIQUE INDEX companies_domain ON companies (workspace_id, domain) WHERE domain <> '';

CREATE TABLE orders (
    workspace_id UUID NOT NULL,
    order_id TEXT NOT NULL,
    contact_id UUID NOT NULL,
    currency TEXT NOT NULL,
    total_micros BIGINT NOT NULL,
    line_items JSONB NOT NULL DEFAULT '[]',
    ordered_at TIMESTAMPTZ NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, order_id)
);
CREATE INDEX orders_contact ON orders (workspace_id, contact_id, ordered_at DESC, order_id DESC);

-- One time-ordered stream per contact; entry ids are UUIDv7 (time first).
CREATE TABLE timeline (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    entry_id UUID NOT NULL,
    kind TEXT NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    summary TEXT NOT NULL,
    details JSONB NOT NULL DEFAULT '{}',
    PRIMARY KEY (workspace_id, contact_id, entry_id)
);

-- Results of BatchUpsertContacts by request id.
CREATE TABLE batch_requests (
    workspace_id UUID NOT NULL,
    request_id TEXT NOT NULL,
    contact_ids UUID[] NOT NULL,
    created BOOLEAN[] NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, request_id)
);

-- CRM sync: for each field a connector set, the source time of the value
-- now held, so an older change never overwrites a newer one.
CREATE TABLE field_times (
    workspace_id UUID NOT NULL,
    contact_id UUID NOT NULL,
    field TEXT NOT NULL,
    source TEXT NOT NULL,
    source_time TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, contact_id, field)
);

CREATE TABLE deals (
    workspace_id UUID NOT NULL,
    deal_id TEXT NOT NULL,
    connector TEXT NOT NULL,
    contact_id UUID,
    name TEXT NOT NULL DEFAULT '',
    stage TEXT NOT NULL DEFAULT '',
    currency TEXT NOT NULL DEFAULT '',
    amount_micros BIGINT NOT NULL DEFAULT 0,
    source_time TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (workspace_id, connector, deal_id)
);
CREATE INDEX deals_contact ON deals (workspace_id, contact_id) WHERE contact_id IS NOT NULL;

-- Replaced by batch_requests, which holds single upserts too.
DROP TABLE upsert_requests;
