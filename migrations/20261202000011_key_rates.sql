-- A key's own submission rate, beside its tenant's (`conveyor-api keys set-rate`): a
-- submission takes a token from both buckets or from neither. NULL: the tenant's alone.
ALTER TABLE api_keys
    ADD COLUMN rate_per_sec double precision CHECK (rate_per_sec > 0),
    ADD COLUMN rate_burst   integer CHECK (rate_burst > 0);
