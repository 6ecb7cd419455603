-- A collection's documents and chunks, kept on its row: `GET /v1/collections`, every ingest
-- submission's preflight and the `max_chunks` quota read them there, where each read counted
-- the collection's documents (or the tenant's chunks, millions perhaps) at every call.
--
-- Kept by statement-level triggers on `documents`, whose `chunks` column is the number of
-- the document's chunk rows (`replace_documents` writes both in one transaction): one update of
-- the collection's row per statement, however many documents or chunks it writes, and none
-- at all for statements on `chunks`. Deleting a collection cascades to its documents; the
-- trigger then finds no row to update. The function runs as the caller (the role that owns
-- and writes these tables); the tables have no row security.
--
-- Writers of documents wait until this migration commits: none is missed or counted twice.
LOCK TABLE documents IN SHARE ROW EXCLUSIVE MODE;

ALTER TABLE collections
    ADD COLUMN documents bigint NOT NULL DEFAULT 0,
    ADD COLUMN chunks bigint NOT NULL DEFAULT 0;

CREATE FUNCTION collections_count_documents() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE collections c
        SET documents = c.documents + d.documents, chunks = c.chunks + d.chunks
        FROM (SELECT collection_id, count(*) AS documents, sum(chunks) AS chunks
              FROM new_documents GROUP BY collection_id) d
        WHERE c.id = d.collection_id;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE collections c
        SET documents = c.documents - d.documents, chunks = c.chunks - d.chunks
        FROM (SELECT collection_id, count(*) AS documents, sum(chunks) AS chunks
              FROM old_documents GROUP BY collection_id) d
        WHERE c.id = d.collection_id;
    ELSE
        -- A re-ingest's upsert changes a document's chunks; its collection never changes.
        UPDATE collections c
        SET documents = c.documents + d.documents, chunks = c.chunks + d.chunks
        FROM (SELECT collection_id, sum(n) AS documents, sum(k) AS chunks
              FROM (SELECT collection_id, 1 AS n, chunks AS k FROM new_documents
                    UNION ALL
                    SELECT collection_id, -1, -chunks FROM old_documents) AS moved
              GROUP BY collection_id
              HAVING sum(n) <> 0 OR sum(k) <> 0) d
        WHERE c.id = d.collection_id;
    END IF;
    RETURN NULL;
END
$$;

-- One trigger an event: PostgreSQL allows transition tables only on single-event triggers.
CREATE TRIGGER documents_counted_on_insert AFTER INSERT ON documents
    REFERENCING NEW TABLE AS new_documents
    FOR EACH STATEMENT EXECUTE FUNCTION collections_count_documents();
CREATE TRIGGER documents_counted_on_update AFTER UPDATE ON documents
    REFERENCING OLD TABLE AS old_documents NEW TABLE AS new_documents
    FOR EACH STATEMENT EXECUTE FUNCTION collections_count_documents();
CREATE TRIGGER documents_counted_on_delete AFTER DELETE ON documents
    REFERENCING OLD TABLE AS old_documents
    FOR EACH STATEMENT EXECUTE FUNCTION collections_count_documents();

UPDATE collections c
SET documents = d.documents, chunks = d.chunks
FROM (SELECT collection_id, count(*) AS documents, coalesce(sum(chunks), 0) AS chunks
      FROM documents GROUP BY collection_id) d
WHERE c.id = d.collection_id;
