-- A dispatch pass as one round trip, and its records without WAL.
--
-- `dispatched_jobs` becomes unlogged: a record is soft state (which queued jobs are in Redis,
-- which jobs count against their tenant's share), so writing it to the WAL and waiting for a
-- flush at each pass's commit bought nothing. A crash empties the table; the maintenance
-- `dispatcher` duty then records the running jobs again, and the queued jobs that were in Redis
-- are pushed once more (their second message claims nothing).
ALTER TABLE dispatched_jobs SET UNLOGGED;

-- One pass for a kind: takes the kind's pass lock, works out the free room (the live workers'
-- slots, busy or about to be, and a round of them waiting in Redis: at least `min_window`),
-- chooses held jobs by fair share, records them and returns them in the order to push.
--
-- Fair share: the n-th held job of a tenant (its priority order) takes its turn at
-- (jobs in flight + n - 1) / weight, ties to the older job; the earliest turns fill the room.
-- Taking the earliest turns is the same as giving each next slot to the tenant with the fewest
-- jobs in flight per unit of weight. A tenant's cap (its `max_running` for the kind, else
-- `default_cap`; NULL: none) bounds its jobs in flight.
--
-- PL/pgSQL: each statement reads a fresh snapshot, so the reads after the lock see every pass
-- that committed before this one got it.
CREATE FUNCTION dispatch_pass(kind_name text, live_within_secs float8, min_window bigint,
                              default_cap bigint)
RETURNS TABLE (job_id uuid, generation integer)
LANGUAGE plpgsql
-- Plans fixed once per session: the scans must step through the index in order and stop at
-- the room, never hash the whole backlog (a fresh table's statistics invite that).
SET enable_hashjoin = off SET enable_mergejoin = off SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    room bigint;
    chosen uuid[];
    generations integer[];
BEGIN
    PERFORM pg_advisory_xact_lock(1684632432, hashtext(kind_name)); -- 0x64697370, "disp"

    SELECT slots + greatest(slots, min_window) - in_flight INTO room
    FROM (SELECT
        (SELECT coalesce(sum((w.queues ->> kind_name)::bigint), 0) FROM workers w
         WHERE w.stopped_at IS NULL
           AND w.heartbeat_at > now() - make_interval(secs => live_within_secs)
           AND jsonb_typeof(w.queues -> kind_name) = 'number') AS slots,
        (SELECT count(*) FROM dispatched_jobs d WHERE d.kind = kind_name) AS in_flight) AS s;
    IF room <= 0 THEN
        RETURN;
    END IF;

    -- The tenants with queued jobs, one index probe each; held: queued with no record. A
    -- tenant's scan steps over its jobs in flight (at most about a round of slots), found
    -- through the record's primary key.
    WITH RECURSIVE tenants AS (
        (SELECT j.tenant_id FROM jobs j
         WHERE j.kind = kind_name AND j.status = 'queued'
         ORDER BY j.tenant_id LIMIT 1)
        UNION ALL
        SELECT (SELECT j.tenant_id FROM jobs j
                WHERE j.kind = kind_name AND j.status = 'queued' AND j.tenant_id > t.tenant_id
                ORDER BY j.tenant_id LIMIT 1)
        FROM tenants t WHERE t.tenant_id IS NOT NULL
    ), shares AS MATERIALIZED (
        SELECT t.tenant_id,
               (SELECT count(*) FROM dispatched_jobs d
                WHERE d.kind = kind_name AND d.tenant_id = t.tenant_id) AS in_flight,
               coalesce(CASE WHEN jsonb_typeof(l.max_running -> kind_name) = 'number'
                             THEN (l.max_running ->> kind_name)::numeric::bigint END,
                        default_cap) AS cap,
               greatest(coalesce(l.weight, 1), 1) AS weight
        FROM tenants t LEFT JOIN tenant_limits l ON l.tenant_id = t.tenant_id
        WHERE t.tenant_id IS NOT NULL
    ), turns AS (
        SELECT h.id, h.attempt, (s.in_flight + h.n - 1)::float8 / s.weight AS turn
        FROM shares s CROSS JOIN LATERAL (
            SELECT j.id, j.attempt, row_number() OVER (ORDER BY j.priority DESC, j.id) AS n
            FROM jobs j
            WHERE j.kind = kind_name AND j.tenant_id = s.tenant_id AND j.status = 'queued'
              AND NOT EXISTS (SELECT 1 FROM dispatched_jobs d WHERE d.job_id = j.id)
            ORDER BY j.priority DESC, j.id
            LIMIT CASE WHEN s.cap IS NULL THEN room
                       ELSE greatest(least(room, s.cap - s.in_flight), 0) END
        ) AS h
        ORDER BY turn, h.id
        LIMIT room
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
