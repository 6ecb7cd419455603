-- Stored files whose rows are gone (a dataset's, a saved model's), marked in the transaction
-- that deletes the row. Whoever deleted it removes the file at once and the mark with it; a
-- failure there (the store down, the process stopped) left a file no route shows and no quota
-- counts. The worker's object-deletes duty removes what is still marked.
CREATE TABLE object_deletes (
    kind       text NOT NULL CHECK (kind IN ('dataset', 'model')),
    id         uuid NOT NULL,
    tenant_id  uuid NOT NULL,
    due_at     timestamptz NOT NULL DEFAULT now(),
    attempts   integer NOT NULL DEFAULT 0,
    PRIMARY KEY (kind, id)
);
CREATE INDEX object_deletes_due ON object_deletes (due_at);
