-- Dispatch passes that resume where the last one stopped.
--
-- A pass found a tenant's held jobs by scanning its queued jobs from the first, stepping over
-- the ones in flight, and over every index entry of a job that has left `queued` since the
-- table was last vacuumed: during a drain, one more entry per job run, so each pass of a
-- 20,000-job drain read more than the one before (1.4 ms and ~1,000 buffers a pass after 16,000
-- jobs, one tenant). A cursor per kind and tenant remembers the last job a pass chose: every
-- held job before it in the tenant's order (priority, then age) is in flight, so a pass may
-- start after it and read only the jobs it takes.
--
-- Held jobs appear before a cursor only when a job becomes queued (submitted, promoted,
-- retried, handed back, rescued) or loses its record while still queued (a failed push), and
-- each of those asks for a full pass: it takes the kind's tenants with queued jobs afresh,
-- resets their cursors and scans from the first job. The passes after ended attempts resume.
-- Soft state like the records: unlogged; a crash empties it and the next full pass fills it.
--
-- Two rounds of slots wait in Redis where one did: with one round, two worker processes
-- draining a backlog often found the queue short and fetched, claimed and finished in smaller
-- batches than with their whole backlog in Redis (0.67x of 07477c5's drain rate with two
-- workers and 1.06x with one). A tenant arriving behind another's backlog waits behind those
-- two rounds at most.
CREATE UNLOGGED TABLE dispatch_cursors (
    kind      text NOT NULL,
    tenant_id uuid NOT NULL,
    -- The last job a pass chose and its priority; NULL: the pass starts at the first job.
    priority  smallint,
    job_id    uuid,
    PRIMARY KEY (kind, tenant_id)
);

-- The held order as one ascending key, so that "after the cursor" is one index range: a row
-- comparison on (-priority, id).
DROP INDEX jobs_held;
CREATE INDEX jobs_held ON jobs (kind, tenant_id, (-priority::int4), id) WHERE status = 'queued';

DROP FUNCTION dispatch_pass(text, float8, bigint, bigint);

-- One pass for a kind: takes the kind's pass lock; a full pass (`resume` false) records the
-- tenants with queued jobs, at their first job; works out the free room (the live workers'
-- slots, busy or about to be, and two rounds of them waiting in Redis: at least `min_window`);
-- chooses held jobs after each tenant's cursor by fair share, records them, moves the cursors
-- and returns the jobs in the order to push.
--
-- Fair share: the n-th held job of a tenant (its priority order) takes its turn at
-- (jobs in flight + n - 1) / weight, ties to the older job; the earliest turns fill the room.
-- Taking the earliest turns is the same as giving each next slot to the tenant with the fewest
-- jobs in flight per unit of weight. A tenant's cap (its `max_running` for the kind, else
-- `default_cap`; NULL: none) bounds its jobs in flight. A tenant's chosen jobs are always the
-- first of its held jobs after its cursor, so the last of them is its next cursor.
--
-- PL/pgSQL: each statement reads a fresh snapshot, so the reads after the lock see every pass
-- that committed before this one got it.
CREATE FUNCTION dispatch_pass(kind_name text, live_within_secs float8, min_window bigint,
                              default_cap bigint, resume boolean DEFAULT false)
RETURNS TABLE (job_id uuid, generation integer)
LANGUAGE plpgsql
-- Plans fixed once per session: the scans must step through the indexes in order and stop at
-- the room, never scan or hash a whole table (a fresh table's statistics invite that), and
-- never by bitmap: only a plain index scan marks the entries of deleted records dead as it
-- passes them, so that counting a kind's records does not read every record deleted since the
-- table was last vacuumed, at each pass.
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off
SET enable_bitmapscan = off
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    room bigint;
    chosen uuid[];
    generations integer[];
BEGIN
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

    SELECT slots + greatest(2 * slots, min_window) - in_flight INTO room
    FROM (SELECT
        (SELECT coalesce(sum((w.queues ->> kind_name)::bigint), 0) FROM workers w
         WHERE w.stopped_at IS NULL
           AND w.heartbeat_at > now() - make_interval(secs => live_within_secs)
           AND jsonb_typeof(w.queues -> kind_name) = 'number') AS slots,
        (SELECT count(*) FROM dispatched_jobs d WHERE d.kind = kind_name) AS in_flight) AS s;
    IF room <= 0 THEN
        RETURN;
    END IF;

    -- Held: queued with no record. The jobs after a tenant's cursor are one range of
    -- `jobs_held`, read only as far as the tenant may take.
    WITH shares AS MATERIALIZED (
        SELECT c.tenant_id, s.in_flight, greatest(coalesce(l.weight, 1), 1) AS weight,
               -- NULL: from the first job (-32769 lies below every -priority).
               coalesce(-c.priority::int4, -32769) AS after_order,
               coalesce(c.job_id, '00000000-0000-0000-0000-000000000000') AS after_job,
               CASE WHEN k.cap IS NULL THEN room
                    ELSE greatest(least(room, k.cap - s.in_flight), 0) END AS take
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
        SELECT s.tenant_id, h.id, h.attempt, h.priority,
               (s.in_flight + h.n - 1)::float8 / s.weight AS turn
        FROM shares s CROSS JOIN LATERAL (
            SELECT j.id, j.attempt, j.priority,
                   row_number() OVER (ORDER BY -j.priority::int4, j.id) AS n
            FROM jobs j
            WHERE j.kind = kind_name AND j.tenant_id = s.tenant_id AND j.status = 'queued'
              AND (-j.priority::int4, j.id) > (s.after_order, s.after_job)
              AND NOT EXISTS (SELECT 1 FROM dispatched_jobs d WHERE d.job_id = j.id)
            ORDER BY -j.priority::int4, j.id
            LIMIT s.take
        ) AS h
        ORDER BY turn, h.id
        LIMIT room
    ), last AS (
        SELECT DISTINCT ON (t.tenant_id) t.tenant_id, t.priority, t.id
        FROM turns t ORDER BY t.tenant_id, t.priority, t.id DESC
    ), moved AS (
        UPDATE dispatch_cursors c SET priority = l.priority, job_id = l.id
        FROM last l
        WHERE c.kind = kind_name AND c.tenant_id = l.tenant_id
    )
    SELECT array_agg(id ORDER BY turn, id), array_agg(attempt ORDER BY turn, id)
    INTO chosen, generations
    FROM turns;
    IF chosen IS NULL THEN
        RETURN;
    END IF;

    -- Only jobs still queued: one cancelled since the read above is not recorded. (A cancel
    -- that commits after this statement removes the record itself.)
    RETURN QUERY
        WITH marked AS (
            INSERT INTO dispatched_jobs (job_id, kind, tenant_id)
            SELECT j.id, j.kind, j.tenant_id FROM jobs j
            WHERE j.id = ANY (chosen) AND j.status = 'queued'
            ON CONFLICT (job_id) DO NOTHING
            RETURNING dispatched_jobs.job_id
        )
        SELECT c.id, c.generation
        FROM unnest(chosen, generations) WITH ORDINALITY AS c(id, generation, n)
        JOIN marked m ON m.job_id = c.id
        ORDER BY c.n;
END
$$;
