-- Collections: documents split into chunks, embedded, searchable by vector and by keyword.
-- pgvector lives in the same PostgreSQL as the control plane (scripts/services provides one).
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE collections (
    id          uuid PRIMARY KEY,
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    name        text NOT NULL,
    model       text NOT NULL,
    max_tokens  integer NOT NULL,
    overlap     integer NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name)
);
CREATE INDEX collections_tenant_page ON collections (tenant_id, id DESC);

-- One row per indexed document; its content hash makes re-ingesting it unchanged a no-op.
CREATE TABLE documents (
    collection_id  uuid NOT NULL REFERENCES collections (id) ON DELETE CASCADE,
    id             text NOT NULL,
    content_hash   text NOT NULL,
    metadata       jsonb NOT NULL DEFAULT '{}',
    chunks         integer NOT NULL,
    job_id         uuid NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (collection_id, id)
);

CREATE TABLE chunks (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    collection_id  uuid NOT NULL,
    document_id    text NOT NULL,
    ordinal        integer NOT NULL,
    text           text NOT NULL,
    -- the document's metadata, copied so that filters need no join
    metadata       jsonb NOT NULL DEFAULT '{}',
    -- all-MiniLM-L6-v2, unit length
    embedding      vector(384) NOT NULL,
    tsv            tsvector GENERATED ALWAYS AS (to_tsvector('english', text)) STORED,
    UNIQUE (collection_id, document_id, ordinal),
    FOREIGN KEY (collection_id, document_id) REFERENCES documents (collection_id, id)
        ON DELETE CASCADE
);
CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_cosine_ops);
CREATE INDEX chunks_tsv ON chunks USING gin (tsv);
CREATE INDEX chunks_metadata ON chunks USING gin (metadata jsonb_path_ops);
