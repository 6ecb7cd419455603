"""Loads N chunk vectors into the collections schema (the real migrations), builds the HNSW
index, then runs 200 vector searches the way the API does (collection filter, pgvector
iterative scan, ef_search 100 for k = 10) and the same searches exactly (no index).

Embedding 100,000 texts would take this 2-core machine most of an hour, so the vectors are
made from 2,000 real sentence embeddings: each chunk is a normalised mix of three of them plus
noise, which keeps the clustered shape of real text embeddings (uniform random vectors
would flatter nobody: HNSW recall on them is unrealistically poor). Queries are fresh mixes."""

import glob, os, random, sys, time, uuid

import numpy as np
import psycopg
from sentence_transformers import SentenceTransformer  # only for the base embeddings

MODEL, N = sys.argv[1], int(sys.argv[2])
PG = os.environ["CONVEYOR_PG_URL"]
DB = "conveyor_search_bench"
K, QUERIES = 10, 200

words = [w for w in open(os.path.join(MODEL, "vocab.txt")).read().split() if w.isalpha() and len(w) >= 3]
rng = random.Random(7)
sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 40))) for _ in range(2000)]
cache = ".data/bench-base-embeddings.npy"
if os.path.exists(cache):
    base = np.load(cache)
else:
    started = time.perf_counter()
    base = SentenceTransformer(MODEL, device="cpu").encode(sentences, batch_size=32, normalize_embeddings=True)
    np.save(cache, base)
    print(f"embedded {len(base):,} base sentences in {time.perf_counter() - started:.0f}s", flush=True)

np_rng = np.random.default_rng(7)


def mixes(n):
    i, j, l = (np_rng.integers(0, len(base), n) for _ in range(3))
    v = base[i] + 0.6 * base[j] + 0.3 * base[l] + np_rng.normal(0, 0.02, (n, base.shape[1]))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def text(v):
    return "[" + ",".join(f"{x:.6f}" for x in v) + "]"


with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
    admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    admin.execute(f"CREATE DATABASE {DB}")
try:
    with psycopg.connect(f"{PG}/{DB}", autocommit=True) as db:
        for path in sorted(glob.glob("migrations/*.sql")):
            db.execute(open(path).read())
        tenant, collection, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        db.execute("INSERT INTO tenants (id, name) VALUES (%s, 'bench')", (tenant,))
        for c in (collection, other):
            db.execute("INSERT INTO collections (id, tenant_id, name, model, max_tokens, overlap) "
                       "VALUES (%s, %s, %s, 'all-MiniLM-L6-v2', 200, 32)", (c, tenant, str(c)))
        # Built after the load (faster); the same index the migration declares.
        db.execute("DROP INDEX chunks_embedding")
        started = time.perf_counter()
        vectors = mixes(N)
        # A tenth of the rows belong to another collection, so the filter has work to do.
        owners = [other if i % 10 == 9 else collection for i in range(N)]
        documents = sorted({(owner, f"doc-{i // 4}") for i, owner in enumerate(owners)})
        with db.cursor().copy("COPY documents (collection_id, id, content_hash, chunks, job_id) FROM STDIN") as copy:
            for owner, doc in documents:
                copy.write_row((owner, doc, "x", 4, tenant))
        with db.cursor().copy("COPY chunks (collection_id, document_id, ordinal, text, embedding) FROM STDIN") as copy:
            for i, (owner, v) in enumerate(zip(owners, vectors)):
                copy.write_row((owner, f"doc-{i // 4}", i % 4, f"chunk {i}", text(v)))
        print(f"loaded {N:,} chunks in {time.perf_counter() - started:.0f}s", flush=True)
        started = time.perf_counter()
        db.execute("SET maintenance_work_mem = '1GB'")
        db.execute("CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_cosine_ops)")
        db.execute("ANALYZE chunks")
        print(f"built the HNSW index in {time.perf_counter() - started:.0f}s\n", flush=True)

        query = ("WITH nearest AS MATERIALIZED (SELECT id, embedding <=> %s::vector AS distance FROM chunks "
                 "WHERE collection_id = %s ORDER BY distance LIMIT %s) SELECT id FROM nearest ORDER BY distance")
        latencies, recalls = [], []
        for q in mixes(QUERIES):
            with db.transaction():
                db.execute("SET LOCAL hnsw.ef_search = 100")
                db.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
                started = time.perf_counter()
                approx = [r[0] for r in db.execute(query, (text(q), collection, K))]
                latencies.append((time.perf_counter() - started) * 1000)
            with db.transaction():
                db.execute("SET LOCAL enable_indexscan = off")
                exact = [r[0] for r in db.execute(query, (text(q), collection, K))]
            recalls.append(len(set(approx) & set(exact)) / K)
        plan = "\n".join(r[0] for r in db.execute("EXPLAIN " + query, (text(q), collection, K)))
        assert "chunks_embedding" in plan, plan
finally:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")

p50, p99 = np.percentile(latencies, [50, 99])
print(f"| chunks | queries | k | p50 ms | p99 ms | recall@{K} vs exact (mean) | min |")
print(f"|---:|---:|---:|---:|---:|---:|---:|")
print(f"| {N:,} | {QUERIES} | {K} | {p50:.2f} | {p99:.2f} | {np.mean(recalls):.3f} | {min(recalls):.1f} |")
