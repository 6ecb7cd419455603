-- The chunks a running ingest counted against `max_chunks` when it passed its check, held until
-- it ends: two ingests of one tenant that each fit alone were both let through, because
-- neither had stored anything when the other checked. A reservation counts only while its job
-- runs; the check removes the tenant's others.
CREATE TABLE chunk_reservations (
    job_id     uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    chunks     bigint NOT NULL CHECK (chunks >= 0)
);
CREATE INDEX chunk_reservations_by_tenant ON chunk_reservations (tenant_id);
