-- Workspaces are the tenants. Every row in every service carries a workspace_id.
CREATE TABLE workspaces (
    workspace_id UUID PRIMARY KEY,
    name TEXT NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- API keys authenticate gRPC callers. Only a SHA-256 digest of the key is
-- stored: keys are 256-bit random secrets, so a fast digest is enough, and a
-- leaked table reveals no usable key.
CREATE TABLE api_keys (
    key_id UUID PRIMARY KEY,
    workspace_id UUID NOT NULL REFERENCES workspaces (workspace_id) ON DELETE CASCADE,
    key_digest BYTEA NOT NULL UNIQUE,
    -- The first characters of the key, to tell keys apart in listings.
    key_prefix TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('api', 'write')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at TIMESTAMPTZ
);

CREATE INDEX api_keys_workspace ON api_keys (workspace_id);
