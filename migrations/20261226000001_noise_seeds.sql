-- The seed of a private synthesis's noise (`epsilon`), drawn from the operating system by its
-- first attempt and read by every later one: each attempt fitted with fresh noise, so a retry
-- after the first had published (or a retry by hand) released the same private data twice,
-- spending ε again under a report of ε once. With the same seed and the same rows, a retry
-- draws the same noise and releases the same values. `dataset_sha256`: the rows the noise was
-- drawn for; a retry on other rows is refused (the same noise over two tables tells their
-- difference exactly). Never shown to tenants.
CREATE TABLE noise_seeds (
    job_id         uuid PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    seed           bytea NOT NULL CHECK (length(seed) = 32),
    dataset_sha256 text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
