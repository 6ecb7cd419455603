-- Webhooks: a tenant's HTTPS (or HTTP) endpoints told of its jobs' outcomes, signed per the
-- Standard Webhooks spec with a per-endpoint secret (encrypted at rest like connections).
-- Deliveries are a durable outbox: the row of a job's terminal outcome and its deliveries are
-- written by one statement, and the leading worker sends them (retrying with backoff).

CREATE TABLE webhooks (
    id               uuid PRIMARY KEY,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- The key that created it.
    key_id           uuid,
    url              text NOT NULL,
    -- `job.succeeded`, `job.failed`, `job.cancelled`.
    events           text[] NOT NULL,
    -- `whsec_<base64>`, sealed with CONVEYOR_SECRET_KEY (bound to the tenant and the webhook).
    secret_encrypted bytea NOT NULL,
    -- Set when a delivery ran out of retries; cleared by the next successful one.
    failing_since    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX webhooks_tenant ON webhooks (tenant_id, id);

-- A UUIDv7 (time-ordered) made in SQL (uuidv7() is PostgreSQL 18's).
CREATE FUNCTION conveyor_uuidv7() RETURNS uuid LANGUAGE sql VOLATILE AS $$
    SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
        placing substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
        FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid
$$;

CREATE TABLE webhook_deliveries (
    -- Also the `webhook-id` header: the same on every attempt, so receivers can deduplicate.
    id               uuid PRIMARY KEY,
    webhook_id       uuid NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    tenant_id        uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    event            text NOT NULL,
    -- No foreign key: the delivery's history outlives the job's retention.
    job_id           uuid,
    -- The body sent: {type, timestamp, data}.
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    -- When a pending delivery is next tried. Claiming an attempt pushes it a lease ahead, so a
    -- worker that dies mid-attempt leaves the delivery to be tried again after the lease.
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    -- Retries stop (status `failed`) once the next one would be later than this plus
    -- CONVEYOR_WEBHOOK_RETRY_HOURS; a replay starts the window again.
    retry_started_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    last_latency_ms  integer,
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz
);

-- What the delivery duty reads four times a second.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
-- A webhook's deliveries, newest first.
CREATE INDEX webhook_deliveries_page ON webhook_deliveries (webhook_id, id DESC);
