-- A claim returned whole `jobs` rows (`SETOF jobs`): each claimed row, payload and all 27
-- columns, was formed into the update's result, copied into the function's result and read
-- again, under the kind's lock, for a caller that reads six of them. Now it returns those six.
-- A function's result type cannot be replaced in place, hence the drop.
--
-- As in 20261212000001, with that change.
DROP FUNCTION claim_jobs(text, text, bigint, bigint, boolean);

CREATE FUNCTION claim_jobs(kind_name text, worker_name text, wanted bigint, default_cap bigint,
                           resume boolean DEFAULT false)
RETURNS TABLE (id uuid, tenant_id uuid, kind text, payload jsonb, attempt integer,
               max_attempts integer)
LANGUAGE plpgsql
-- Plans fixed once per session: the scans must step through the indexes in order and stop at
-- what is wanted, never scan or hash a whole table (a fresh table's statistics invite that),
-- and never by bitmap: only a plain index scan marks dead the entries of jobs no longer running
-- as it passes them, so that counting a tenant's running jobs does not read every job that ran
-- since the table was last vacuumed, at each claim.
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
SET enable_sort = off
AS $$
#variable_conflict use_column
DECLARE
    chosen uuid[];
BEGIN
    IF wanted <= 0 THEN
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(1684632432, hashtext(kind_name)); -- 0x64697370, "disp"

    -- The tenants with queued jobs, one index probe each.
    IF NOT resume THEN
        WITH RECURSIVE tenants AS (
            (SELECT j.tenant_id FROM jobs j
             WHERE j.kind = kind_name AND j.status = 'queued'
             ORDER BY j.tenant_id LIMIT 1)
            UNION ALL
            SELECT (SELECT j.tenant_id FROM jobs j
                    WHERE j.kind = kind_name AND j.status = 'queued' AND j.tenant_id > t.tenant_id
                    ORDER BY j.tenant_id LIMIT 1)
            FROM tenants t WHERE t.tenant_id IS NOT NULL
        ), queued AS (
            SELECT t.tenant_id FROM tenants t WHERE t.tenant_id IS NOT NULL
        ), drained AS (
            DELETE FROM dispatch_cursors c
            WHERE c.kind = kind_name
              AND NOT EXISTS (SELECT 1 FROM queued q WHERE q.tenant_id = c.tenant_id)
        )
        INSERT INTO dispatch_cursors (kind, tenant_id)
        SELECT kind_name, q.tenant_id FROM queued q
        ON CONFLICT (kind, tenant_id) DO UPDATE SET priority = NULL, job_id = NULL;
    END IF;

    -- The jobs after a tenant's cursor are one range of `jobs_held`, read only as far as the
    -- tenant may take.
    WITH shares AS MATERIALIZED (
        SELECT c.tenant_id, s.in_flight, greatest(coalesce(l.weight, 1), 1) AS weight,
               -- NULL: from the first job (-32769 lies below every -priority).
               coalesce(-c.priority::int4, -32769) AS after_order,
               coalesce(c.job_id, '00000000-0000-0000-0000-000000000000') AS after_job,
               CASE WHEN k.cap IS NULL THEN wanted
                    ELSE greatest(least(wanted, k.cap - s.in_flight), 0) END AS take
        FROM dispatch_cursors c
        LEFT JOIN tenant_limits l ON l.tenant_id = c.tenant_id
        CROSS JOIN LATERAL (SELECT count(*) AS in_flight FROM jobs r
                            WHERE r.kind = kind_name AND r.tenant_id = c.tenant_id
                              AND r.status = 'running') AS s
        CROSS JOIN LATERAL (SELECT coalesce(
            CASE WHEN jsonb_typeof(l.max_running -> kind_name) = 'number'
                 THEN (l.max_running ->> kind_name)::numeric::bigint END,
            default_cap) AS cap) AS k
        WHERE c.kind = kind_name
    ), turns AS (
        SELECT s.tenant_id, h.id, h.priority,
               (s.in_flight + h.n - 1)::float8 / s.weight AS turn
        FROM shares s CROSS JOIN LATERAL (
            SELECT j.id, j.priority,
                   row_number() OVER (ORDER BY -j.priority::int4, j.id) AS n
            FROM jobs j
            WHERE j.kind = kind_name AND j.tenant_id = s.tenant_id AND j.status = 'queued'
              AND (-j.priority::int4, j.id) > (s.after_order, s.after_job)
            ORDER BY -j.priority::int4, j.id
            LIMIT s.take
        ) AS h
        ORDER BY turn, h.id
        LIMIT wanted
    ), last AS (
        SELECT DISTINCT ON (t.tenant_id) t.tenant_id, t.priority, t.id
        FROM turns t ORDER BY t.tenant_id, t.priority, t.id DESC
    ), moved AS (
        UPDATE dispatch_cursors c SET priority = l.priority, job_id = l.id
        FROM last l
        WHERE c.kind = kind_name AND c.tenant_id = l.tenant_id
    )
    SELECT array_agg(id ORDER BY turn, id) INTO chosen FROM turns;
    IF chosen IS NULL THEN
        RETURN;
    END IF;

    -- Only jobs still queued: one cancelled since the read above is not claimed.
    RETURN QUERY
        WITH claimed AS (
            UPDATE jobs j SET status = 'running', attempt = j.attempt + 1, worker = worker_name,
                progress = 0, message = NULL, started_at = now(), updated_at = now()
            WHERE j.id = ANY (chosen) AND j.status = (SELECT 'queued'::text)
              AND NOT j.cancel_requested
            RETURNING j.id, j.tenant_id, j.kind, j.payload, j.attempt, j.max_attempts
        )
        SELECT c.id, c.tenant_id, c.kind, c.payload, c.attempt, c.max_attempts
        FROM claimed c ORDER BY array_position(chosen, c.id);
END
$$;
