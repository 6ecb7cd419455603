-- Workers claim their jobs from PostgreSQL: one statement chooses a kind's held jobs by fair
-- share and marks them running for the worker that asked.
--
-- Jobs used to travel from a dispatch pass through a Redis list (apalis) to a worker, which
-- then claimed each message with a statement of its own: per job a dispatch record written by
-- the pass, a push, a fetch, an ack (nine Redis commands) and a second round of statements.
-- The pass itself only decided which jobs go next; it now also claims them, so that a job goes
-- from `queued` to `running` in one transaction, and nothing sits between (no Redis entry to
-- lose, re-push or fetch twice; a fair share decided at the moment a slot is free rather than
-- two rounds of slots earlier).
--
-- The dispatch record stays: a narrow unlogged row per running job, what fair share and caps
-- count (a crash empties it and the maintenance duty records the running jobs again).
DROP FUNCTION dispatch_pass(text, float8, bigint, bigint, boolean);

-- Records of jobs not running (the passes recorded the jobs they pushed, still queued) would
-- count against their tenants' caps for ever: only running jobs are recorded now.
DELETE FROM dispatched_jobs d
WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = d.job_id AND j.status = 'running');

-- One claim for a kind: takes the kind's pass lock; a full pass (`resume` false) records the
-- tenants with queued jobs, at their first job; chooses up to `wanted` held jobs after each
-- tenant's cursor by fair share, moves the cursors, marks the chosen jobs running for
-- `worker_name` with their dispatch records, and returns them in the order chosen.
--
-- Fair share: the n-th held job of a tenant (its priority order) takes its turn at
-- (jobs in flight + n - 1) / weight, ties to the older job; the earliest turns are taken. That
-- is the same as giving each next slot to the tenant with the fewest jobs in flight per unit
-- of weight. A tenant's cap (its `max_running` for the kind, else `default_cap`; NULL: none)
-- bounds its jobs in flight. A tenant's chosen jobs are always the first of its held jobs after
-- its cursor, so the last of them is its next cursor: every queued job before a cursor is
-- running, until a job becomes queued again (submitted, promoted, handed back, rescued), after
-- which the worker's next claim is full.
--
-- PL/pgSQL: each statement reads a fresh snapshot, so the reads after the lock see every claim
-- that committed before this one got it.
--
-- The claim commits without waiting for its WAL flush: the lock would otherwise be held through
-- the flush (a third of a claim's time), while the other workers' claims wait for it. The
-- claiming worker runs none of the jobs before a synchronous commit of its own, on the same
-- connection, has flushed the WAL past this one (`store::confirm_claims`); a crash before that
-- loses the claim whole, as it loses anything after it in the WAL, and the jobs are queued
-- again.
CREATE FUNCTION claim_jobs(kind_name text, worker_name text, wanted bigint, default_cap bigint,
                           resume boolean DEFAULT false)
RETURNS SETOF jobs
LANGUAGE plpgsql
-- Plans fixed once per session: the scans must step through the indexes in order and stop at
-- what is wanted, never scan or hash a whole table (a fresh table's statistics invite that),
-- and never by bitmap: only a plain index scan marks the entries of deleted records dead as it
-- passes them, so that counting a kind's records does not read every record deleted since the
-- table was last vacuumed, at each claim.
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
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
        CROSS JOIN LATERAL (SELECT count(*) AS in_flight FROM dispatched_jobs d
                            WHERE d.kind = kind_name AND d.tenant_id = c.tenant_id) AS s
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
            WHERE j.id = ANY (chosen) AND j.status = 'queued' AND NOT j.cancel_requested
            RETURNING j.*
        ), recorded AS (
            INSERT INTO dispatched_jobs (job_id, kind, tenant_id)
            SELECT c.id, c.kind, c.tenant_id FROM claimed c
            ON CONFLICT (job_id) DO NOTHING
        )
        SELECT c.* FROM claimed c ORDER BY array_position(chosen, c.id);
END
$$;
