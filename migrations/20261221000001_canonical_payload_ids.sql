-- Ids in payloads stored before payloads were stored as parsed (2426c7b) keep the spelling they
-- were sent in (upper case, braces, `urn:uuid:`, no hyphens), and the SQL that reads payloads
-- compares text: a schedule naming a dataset so did not hold it, and every later firing failed.
-- The places a kind takes an id (its contracts' `Uuid` fields) are written as they are parsed,
-- in the rows that outlive a deploy: schedules, waiting pipeline steps, and jobs not yet run.
-- Anything else, references (`${steps...}`) and tenants' own fields among them, is left as sent.

CREATE FUNCTION pg_temp.canonical_id(value jsonb) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    text_ text := value #>> '{}';
BEGIN
    IF jsonb_typeof(value) = 'string' AND text_ ~* ('^(urn:uuid:)?([0-9a-f]{8}-[0-9a-f]{4}-'
        '[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-'
        '[0-9a-f]{12}\}|[0-9a-f]{32})$') THEN
        RETURN to_jsonb(regexp_replace(text_, '^urn:uuid:', '', 'i')::uuid::text);
    END IF;
    RETURN value;
END
$$;

-- `payload` with each id a kind takes in its parsed spelling: the top-level ids, and a
-- document source's dataset or bucket.
CREATE FUNCTION pg_temp.canonical_ids(payload jsonb) RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    key_ text;
    i int;
BEGIN
    IF jsonb_typeof(payload) <> 'object' THEN
        RETURN payload;
    END IF;
    FOREACH key_ IN ARRAY ARRAY['dataset_id', 'model_id', 'collection_id', 'connection_id',
                                'patch_job_id'] LOOP
        IF payload ? key_ THEN
            payload := jsonb_set(payload, ARRAY[key_], pg_temp.canonical_id(payload -> key_));
        END IF;
    END LOOP;
    IF jsonb_typeof(payload -> 'documents') = 'array' THEN
        FOR i IN 0 .. jsonb_array_length(payload -> 'documents') - 1 LOOP
            FOREACH key_ IN ARRAY ARRAY['dataset_id', 'bucket_id'] LOOP
                IF jsonb_typeof(payload -> 'documents' -> i) = 'object'
                   AND payload -> 'documents' -> i ? key_ THEN
                    payload := jsonb_set(payload, ARRAY['documents', i::text, key_],
                        pg_temp.canonical_id(payload -> 'documents' -> i -> key_));
                END IF;
            END LOOP;
        END LOOP;
    END IF;
    RETURN payload;
END
$$;

-- A pipeline's steps, each payload as above.
CREATE FUNCTION pg_temp.canonical_steps(pipeline jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN jsonb_typeof(pipeline -> 'steps') = 'array' THEN
        jsonb_set(pipeline, '{steps}', (
            SELECT coalesce(jsonb_agg(CASE WHEN step ? 'payload'
                    THEN jsonb_set(step, '{payload}', pg_temp.canonical_ids(step -> 'payload'))
                    ELSE step END ORDER BY n), '[]')
            FROM jsonb_array_elements(pipeline -> 'steps') WITH ORDINALITY AS s(step, n)))
    ELSE pipeline END
$$;

UPDATE schedules
   SET job = CASE WHEN job ? 'payload'
                  THEN jsonb_set(job, '{payload}', pg_temp.canonical_ids(job -> 'payload'))
                  ELSE job END,
       pipeline = pg_temp.canonical_steps(pipeline)
 WHERE (job ? 'payload' AND pg_temp.canonical_ids(job -> 'payload') <> job -> 'payload')
    OR pg_temp.canonical_steps(pipeline) IS DISTINCT FROM pipeline;

UPDATE pipeline_steps SET payload = pg_temp.canonical_ids(payload)
 WHERE state = 'waiting' AND pg_temp.canonical_ids(payload) <> payload;

-- Not running ones: their payloads were read when they were claimed.
UPDATE jobs SET payload = pg_temp.canonical_ids(payload)
 WHERE status IN ('queued', 'scheduled', 'retrying') AND pg_temp.canonical_ids(payload) <> payload;

DROP FUNCTION pg_temp.canonical_steps(jsonb);
DROP FUNCTION pg_temp.canonical_ids(jsonb);
DROP FUNCTION pg_temp.canonical_id(jsonb);
