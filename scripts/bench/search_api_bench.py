"""End-to-end search through a running API: creates a collection, loads N chunks into it
directly (the vectors and texts of search_bench.py: mixes of 2,000 real sentence embeddings),
builds the HNSW index(es) the migrations declare, then times 200 searches per mode, each the
whole HTTP request (the API embeds the query, checks the collection, runs the SQL), on one
keep-alive connection, after 20 warm-up searches."""

import http.client, json, os, random, sys, time, urllib.parse, uuid

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

BASE, KEY, MODEL, DB_URL, N = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
QUERIES, K = 200, 10

words = [w for w in open(os.path.join(MODEL, "vocab.txt")).read().split() if w.isalpha() and len(w) >= 3]
rng = random.Random(7)
sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 40))) for _ in range(2000)]
cache = ".data/bench-base-embeddings.npy"
if os.path.exists(cache):
    base = np.load(cache)
else:
    from minilm_numpy import MiniLM

    base = MiniLM(MODEL).encode(sentences)
    os.makedirs(".data", exist_ok=True)
    np.save(cache, base)
np_rng = np.random.default_rng(7)


def mixes(n):
    i, j, l = (np_rng.integers(0, len(base), n) for _ in range(3))
    out = np.empty((n, base.shape[1]), np.float32)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        v = base[i[s:e]] + 0.6 * base[j[s:e]] + 0.3 * base[l[s:e]] + np_rng.normal(0, 0.02, (e - s, base.shape[1]))
        out[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, (i, j, l)


url = urllib.parse.urlsplit(BASE)
http_conn = http.client.HTTPConnection(url.hostname, url.port)


def call(method, path, body=None):
    http_conn.request(method, path, body=None if body is None else json.dumps(body),
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = http_conn.getresponse()
    data = response.read()
    assert response.status < 300, (response.status, data)
    return json.loads(data)


collection = call("POST", "/v1/collections", {"name": "bench"})["id"]
vectors, (vi, vj, vl) = mixes(N)
started = time.perf_counter()
with psycopg.connect(DB_URL, autocommit=True) as db:
    register_vector(db)
    tenant = db.execute("SELECT tenant_id FROM collections WHERE id = %s", (collection,)).fetchone()[0]
    indexes = db.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'chunks' "
                         "AND indexdef LIKE '%USING hnsw%'").fetchall()
    for name, _ in indexes:
        db.execute(f"DROP INDEX {name}")
    with db.cursor().copy("COPY documents (collection_id, id, content_hash, chunks, job_id) FROM STDIN") as copy:
        for d in range(0, N, 4):
            copy.write_row((collection, f"doc-{d // 4}", "x", min(4, N - d), str(tenant)))
    with db.cursor().copy("COPY chunks (collection_id, document_id, ordinal, text, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["uuid", "text", "int4", "text", "vector"])
        for r in range(N):
            copy.write_row((uuid.UUID(collection), f"doc-{r // 4}", r % 4,
                            f"{sentences[vi[r]]} {sentences[vj[r]]} {sentences[vl[r]]}", vectors[r]))
    db.execute("VACUUM ANALYZE chunks")
    db.execute("VACUUM ANALYZE documents")
    db.execute("SET maintenance_work_mem = '2GB'")
    for _, definition in indexes:
        db.execute(definition)
    db.execute("ANALYZE chunks")
    index_names = ", ".join(name for name, _ in indexes)
print(f"loaded {N:,} chunks and built {index_names} in {time.perf_counter() - started:.0f}s", flush=True)

_, (qi, _, _) = mixes(QUERIES)
texts = [" ".join(sentences[i].split()[:5]) for i in qi]
rows = []
for mode in ("vector", "hybrid", "keyword"):
    for t in texts[:20]:
        call("POST", f"/v1/collections/{collection}/search", {"query": t, "k": K, "mode": mode})
    lat = []
    for t in texts:
        started = time.perf_counter()
        found = call("POST", f"/v1/collections/{collection}/search", {"query": t, "k": K, "mode": mode})
        lat.append((time.perf_counter() - started) * 1000)
        assert found["results"], (mode, t)
    p50, p99 = np.percentile(lat, [50, 99])
    rows.append((mode, p50, p99))
    print(f"  {mode:7} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms", flush=True)
print(f"\n{N:,} chunks in one collection, {QUERIES} searches per mode (five-word queries), k = {K}, "
      f"end to end (HTTP, query embedded by the API)\n")
print("| mode | p50 ms | p99 ms |\n|---|---:|---:|")
for mode, p50, p99 in rows:
    print(f"| {mode} | {p50:.2f} | {p99:.2f} |")
