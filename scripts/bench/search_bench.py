"""Search at scale, on the PostgreSQL + pgvector the platform uses, in the collections schema
of the real migrations: loads N chunks, builds the HNSW index (time, size), then runs 200 vector
and 200 hybrid searches with the SQL the API sends, and the same searches exactly (no index) for
recall@10. Each search is timed as the API's whole database conversation for it (every round
trip: the collection check, BEGIN/set_config/COMMIT where the shape has them, the statement),
with psycopg preparing statements as sqlx does.

Shapes, side by side in one run:
  before  the API as of commit 692b2a7: get_collection (with its document and chunk counts),
          then BEGIN; SELECT set_config(ef_search), set_config(iterative_scan); the statement;
          COMMIT
  after   the API now: the collection check and the statement (the tenant check inside it),
          one round trip each, hnsw settings being the pool's session defaults

The vectors: embedding N texts would take this 2-core machine hours, so they are made from
2,000 real sentence embeddings (all-MiniLM-L6-v2, computed in numpy by minilm_numpy.py): each
chunk is a normalised mix of three of them plus noise, which keeps the clustered shape of real
text embeddings (uniform random vectors would flatter nobody). A chunk's text is its three
sentences, so keyword search has real work; a query is a fresh mix, its text the first five
words of its main sentence (--query-words; each word is in about 1 % of the chunks, so a
query's words match about 4.5 % of them, all of which the keyword leg ranks).
A tenth of the chunks belong to another collection, so the filter has work to do.

Usage: search_bench.py MODEL N [--keep] [--reuse] [--shapes before,after]
  --keep   leave the database (conveyor_search_bench_N) for EXPLAIN; --reuse  use a kept one"""

import argparse, os, random, statistics, sys, time, uuid

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("n", type=int)
ap.add_argument("--keep", action="store_true")
ap.add_argument("--reuse", action="store_true")
ap.add_argument("--shapes", default="before,all-matches,after")
ap.add_argument("--queries", type=int, default=200)
ap.add_argument("--query-words", type=int, default=5, help="words of a hybrid query's text (0: the whole sentence)")
args = ap.parse_args()
MODEL, N = args.model, args.n
PG = os.environ["CONVEYOR_PG_URL"]
DB = f"conveyor_search_bench_{N}"
K, QUERIES, RRF_K = 10, args.queries, 60

words = [w for w in open(os.path.join(MODEL, "vocab.txt")).read().split() if w.isalpha() and len(w) >= 3]
rng = random.Random(7)
sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 40))) for _ in range(2000)]
cache = ".data/bench-base-embeddings.npy"
if os.path.exists(cache):
    base = np.load(cache)
else:
    from minilm_numpy import MiniLM

    started = time.perf_counter()
    base = MiniLM(MODEL).encode(sentences)
    os.makedirs(".data", exist_ok=True)
    np.save(cache, base)
    print(f"embedded {len(base):,} base sentences in {time.perf_counter() - started:.0f}s", flush=True)

np_rng = np.random.default_rng(7)


def mixes(n):
    i, j, l = (np_rng.integers(0, len(base), n) for _ in range(3))
    out = np.empty((n, base.shape[1]), np.float32)
    for s in range(0, n, 100_000):  # in blocks (1M rows at once would need ~9 GB); same stream
        e = min(n, s + 100_000)
        v = base[i[s:e]] + 0.6 * base[j[s:e]] + 0.3 * base[l[s:e]] + np_rng.normal(0, 0.02, (e - s, base.shape[1]))
        out[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out, (i, j, l)


def connect(db, vector=True):
    conn = psycopg.connect(f"{PG}/{db}", autocommit=True)
    if vector:
        register_vector(conn)
    return conn


def pg_mem(db, what):
    return db.execute(f"SELECT pg_size_pretty({what}::bigint), {what}::bigint").fetchone()


vectors, (vi, vj, vl) = mixes(N)  # drawn first, so the same seed gives the same vectors as before
# A tenth of the rows belong to another collection, so the filter has work to do.
owner_is_other = (np.arange(N) % 10) == 9
build = {}
if not args.reuse:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {DB}")
    with connect(DB, vector=False) as db:
        import glob

        for path in sorted(glob.glob("migrations/*.sql")):
            db.execute(open(path).read())
        register_vector(db)
        tenant, collection, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        db.execute("INSERT INTO tenants (id, name) VALUES (%s, 'bench')", (tenant,))
        for c in (collection, other):
            db.execute("INSERT INTO collections (id, tenant_id, name, model, max_tokens, overlap) "
                       "VALUES (%s, %s, %s, 'all-MiniLM-L6-v2', 200, 32)", (c, tenant, str(c)))
        # Built after the load (faster): every HNSW index on chunks, as the migrations declare them.
        indexes = db.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'chunks' "
                             "AND indexdef LIKE '%USING hnsw%'").fetchall()
        for name, _ in indexes:
            db.execute(f"DROP INDEX {name}")
        if "before" in args.shapes.split(","):
            # The index the API used before migration 20261205000001, for the `before` shape.
            indexes.append(("chunks_embedding", "CREATE INDEX chunks_embedding ON chunks USING hnsw (embedding vector_cosine_ops)"))
        started = time.perf_counter()
        owners = np.where(owner_is_other, str(other), str(collection))
        with db.cursor().copy("COPY documents (collection_id, id, content_hash, chunks, job_id) FROM STDIN") as copy:
            pairs = {}
            for r in range(N):
                pairs[(owners[r], r // 4)] = pairs.get((owners[r], r // 4), 0) + 1
            for (owner, d), count in sorted(pairs.items()):
                copy.write_row((owner, f"doc-{d}", "x", count, str(tenant)))
        with db.cursor().copy("COPY chunks (collection_id, document_id, ordinal, text, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.set_types(["uuid", "text", "int4", "text", "vector"])
            for r in range(N):
                text = f"{sentences[vi[r]]} {sentences[vj[r]]} {sentences[vl[r]]}"
                copy.write_row((uuid.UUID(owners[r]), f"doc-{r // 4}", r % 4, text, vectors[r]))
        build["load_s"] = time.perf_counter() - started
        print(f"loaded {N:,} chunks in {build['load_s']:.0f}s", flush=True)
        db.execute("VACUUM ANALYZE chunks")
        db.execute("VACUUM ANALYZE documents")
        started = time.perf_counter()
        db.execute("SET maintenance_work_mem = '6GB'")
        db.execute("SET max_parallel_maintenance_workers = 2")
        for name, definition in indexes:
            one = time.perf_counter()
            db.execute(definition)
            build[name] = time.perf_counter() - one
            print(f"  {name}: {build[name]:.0f}s, {pg_mem(db, f'pg_relation_size({name!r})')[0]}", flush=True)
        db.execute("ANALYZE chunks")
        build["index_s"] = time.perf_counter() - started
        print(f"built the HNSW index(es) in {build['index_s']:.0f}s", flush=True)
        db.execute("CREATE TABLE bench_meta (tenant uuid, collection uuid, load_s float8, index_s float8)")
        db.execute("INSERT INTO bench_meta VALUES (%s, %s, %s, %s)", (tenant, collection, build["load_s"], build["index_s"]))

db = connect(DB)
tenant, collection, build["load_s"], build["index_s"] = db.execute("SELECT * FROM bench_meta").fetchone()
sizes = {
    "table": pg_mem(db, "pg_table_size('chunks')"),
    "hnsw": pg_mem(db, "pg_relation_size('chunks_embedding_half')"),
    "all indexes": pg_mem(db, "pg_indexes_size('chunks')"),
}
shared_buffers = db.execute("SHOW shared_buffers").fetchone()[0]

queries, (qi, _, _) = mixes(QUERIES)
query_texts = [" ".join(sentences[i].split()[:args.query_words or None]) for i in qi]

# Exact answers, in numpy (the same cosine distance; PostgreSQL's exact scan agrees but takes
# minutes at 1M): the vector top-k, and the hybrid fusion over exact vector candidates.
mask = ~owner_is_other
ids_in = np.nonzero(mask)[0] + 1  # chunk ids are the identity column, 1-based in load order
exact_vec = []
candidates = 100  # what the API fuses for k = 10
exact_cand = []
inside = vectors[mask]
for q in queries:
    d = 1 - inside @ q
    top = np.argpartition(d, candidates)[:candidates]
    top = top[np.lexsort((ids_in[top], d[top]))]
    exact_cand.append([int(x) for x in ids_in[top]])
    exact_vec.append(set(exact_cand[-1][:K]))

# ---- the shapes ----------------------------------------------------------------------------
COLLECTION_COLUMNS = ("c.*, (SELECT count(*) FROM documents d WHERE d.collection_id = c.id) AS documents, "
                      "(SELECT coalesce(sum(d.chunks), 0)::bigint FROM documents d WHERE d.collection_id = c.id) AS chunks")
BEFORE_GET = f"SELECT {COLLECTION_COLUMNS} FROM collections c WHERE c.tenant_id = $1 AND c.id = $2"
KEYWORD = ("keyword AS (SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r, rank FROM (SELECT id, ts_rank_cd(tsv, q) AS rank FROM chunks, "
           "(SELECT replace(plainto_tsquery('english', $1)::text, '&', '|')::tsquery AS q) AS query WHERE tsv @@ q AND collection_id = $2 "
           "ORDER BY rank DESC LIMIT $3) AS ranked)")
# The exact keyword list: every match ranked, ties to the older chunk in the limit as after it
# (the API's order; a limit over tied ranks alone keeps whichever rows the heap held first).
EXACT_KEYWORD = KEYWORD.replace("ORDER BY rank DESC LIMIT $3", "ORDER BY rank DESC, id LIMIT $3")
assert EXACT_KEYWORD != KEYWORD, "the exact keyword list must break ties by id"
NEAREST = ("nearest AS MATERIALIZED (SELECT id, embedding <=> $1 AS distance FROM chunks WHERE collection_id = $2 ORDER BY distance LIMIT $3), "
           "vector AS (SELECT id, row_number() OVER (ORDER BY distance, id) AS r, 1 - distance AS similarity FROM nearest)")
BEFORE_VECTOR = ("WITH " + NEAREST + " SELECT c.id AS chunk_id, c.document_id, c.ordinal, c.text, c.metadata, s.similarity AS score "
                 "FROM vector s JOIN chunks c USING (id) ORDER BY s.r")
BEFORE_HYBRID = ("WITH " + NEAREST + ", " + KEYWORD.replace("$1", "$4").replace("$3", "$5") +
                 f" SELECT c.id AS chunk_id, c.document_id, c.ordinal, c.text, c.metadata, fused.score FROM (SELECT id, coalesce(1.0 / ({RRF_K:.0f} + v.r), 0)::float8 "
                 f"+ coalesce(1.0 / ({RRF_K:.0f} + k.r), 0)::float8 AS score FROM vector v FULL JOIN keyword k USING (id)) AS fused JOIN chunks c USING (id) "
                 "ORDER BY fused.score DESC, c.id LIMIT $6")

def pg(sql):
    """sqlx's $n placeholders as psycopg's."""
    import re

    return re.sub(r"\$(\d+)", lambda m: f"%(p{m.group(1)})s", sql.replace("%", "%%"))


def params(*values):
    return {f"p{i + 1}": v for i, v in enumerate(values)}


def before(conn, mode, q, text):
    rows = conn.execute(pg(BEFORE_GET), params(tenant, collection), prepare=True).fetchall()
    assert rows
    with conn.transaction():
        conn.execute(pg("SELECT set_config('hnsw.ef_search', $1, true), set_config('hnsw.iterative_scan', 'relaxed_order', true)"),
                     params(str(candidates)), prepare=True)
        if mode == "vector":
            return conn.execute(pg(BEFORE_VECTOR), params(q, collection, K), prepare=True).fetchall()
        return conn.execute(pg(BEFORE_HYBRID), params(q, collection, candidates, text, candidates, K), prepare=True).fetchall()


# The API now (contracts/src/ingest/collections.rs): the tenant check inside the statement, the
# HNSW index on halfvec copies with an exact re-rank, limits as literals, ts_rank in hybrid.
AFTER_EXISTS = "SELECT EXISTS (SELECT 1 FROM collections WHERE id = $2 AND tenant_id = $1)"
SCOPE = "collection_id = {c} AND EXISTS (SELECT 1 FROM collections WHERE id = {c} AND tenant_id = {t})"


def after_keyword(query, c, t, limit, rank):
    return ("keyword AS (SELECT id, row_number() OVER (ORDER BY rank DESC, id) AS r, rank FROM (SELECT id, " + rank +
            "(tsv, q) AS rank FROM chunks, (SELECT replace(plainto_tsquery('english', " + query +
            ")::text, '&', '|')::tsquery AS q) AS query WHERE tsv @@ q AND " + SCOPE.format(c=c, t=t) +
            f" ORDER BY rank DESC LIMIT {limit}) AS ranked)")


def after_nearest(v, c, t, v2, limit):
    return ("nearest AS MATERIALIZED (SELECT id, embedding <=> " + v + " AS distance FROM chunks WHERE " + SCOPE.format(c=c, t=t) +
            " ORDER BY embedding::halfvec(384) <=> " + v2 + f"::halfvec(384) LIMIT {limit}), vector AS (SELECT id, "
            "row_number() OVER (ORDER BY distance, id) AS r, 1 - distance AS similarity FROM nearest)")


AFTER_VECTOR = ("WITH " + after_nearest("$1", "$2", "$4", "$5", K) + " SELECT c.id AS chunk_id, c.document_id, c.ordinal, c.text, "
                "c.metadata, s.similarity AS score FROM vector s JOIN chunks c USING (id) ORDER BY s.r").replace("$3", "$2")
def after_fused_keyword(query, c, t, limit):
    """Hybrid's keyword list: chunks holding two of the query's lexemes, then the vector
    candidates holding one (`fused_keyword` in collections.rs)."""
    quoted = r"'''' || replace(replace(lexeme, '\', '\\'), '''', '''''') || ''''"
    return ("terms AS (SELECT replace(plainto_tsquery('english', " + query + ")::text, '&', '|')::tsquery AS q, "
            "(SELECT string_agg(format('(%s & %s)', a, b), ' | ')::tsquery FROM unnest(l) WITH ORDINALITY AS x(a, i) "
            "JOIN unnest(l) WITH ORDINALITY AS y(b, j) ON i < j) AS pairs FROM (SELECT array(SELECT " + quoted +
            " FROM unnest(tsvector_to_array(to_tsvector('english', " + query +
            "))) AS lexeme LIMIT 16) AS l) AS lexemes), matched AS ((SELECT id, true AS strong, ts_rank(tsv, q) AS rank "
            "FROM chunks, terms WHERE tsv @@ coalesce(pairs, q) AND " + SCOPE.format(c=c, t=t) +
            f" ORDER BY rank DESC, id LIMIT {limit}) UNION ALL SELECT id, false, ts_rank(tsv, q) FROM nearest, terms, LATERAL (SELECT tsv FROM chunks WHERE chunks.id = nearest.id OFFSET 0) AS candidate "
            f"WHERE tsv @@ q AND NOT tsv @@ pairs), keyword AS (SELECT id, r FROM (SELECT id, row_number() OVER "
            f"(ORDER BY strong DESC, rank DESC, id) AS r FROM matched) AS ranked WHERE r <= {limit})")


FUSION = (f" SELECT c.id AS chunk_id, c.document_id, c.ordinal, c.text, c.metadata, fused.score FROM (SELECT id, coalesce(1.0 / ({RRF_K:.0f} + v.r), 0)::float8 "
                f"+ coalesce(1.0 / ({RRF_K:.0f} + k.r), 0)::float8 AS score FROM vector v FULL JOIN keyword k USING (id)) AS fused JOIN chunks c USING (id) "
                f"ORDER BY fused.score DESC, c.id LIMIT {K}")
# Hybrid as of commit 035856c: the keyword leg ranks every chunk sharing a word with the query.
ALL_MATCHES_HYBRID = ("WITH " + after_nearest("$1", "$2", "$4", "$5", candidates) + ", " +
                      after_keyword("$6", "$2", "$4", candidates, "ts_rank") + FUSION)
AFTER_HYBRID = ("WITH " + after_nearest("$1", "$2", "$4", "$5", candidates) + ", " +
                after_fused_keyword("$6", "$2", "$4", candidates) + FUSION)


def all_matches(conn, mode, q, text):
    if mode == "vector":
        return after(conn, mode, q, text)
    assert conn.execute(pg(AFTER_EXISTS), params(tenant, collection), prepare=True).fetchone()[0]
    return conn.execute(pg(ALL_MATCHES_HYBRID), params(q, collection, None, tenant, q, text), prepare=True).fetchall()


def after(conn, mode, q, text):
    assert conn.execute(pg(AFTER_EXISTS), params(tenant, collection), prepare=True).fetchone()[0]
    if mode == "vector":
        return conn.execute(pg(AFTER_VECTOR), params(q, collection, None, tenant, q), prepare=True).fetchall()
    return conn.execute(pg(AFTER_HYBRID), params(q, collection, None, tenant, q, text), prepare=True).fetchall()


SHAPES = {"before": before, "all-matches": all_matches, "after": after}


def run(shape, mode):
    conn = connect(DB)
    conn.prepare_threshold = 0
    if shape != "before":
        conn.execute("SET hnsw.ef_search = 100")
        conn.execute("SET hnsw.iterative_scan = relaxed_order")
    fn = SHAPES[shape]
    # Warm-up: the same 20 queries first (caches, prepared statements, plan choice).
    for q, t in list(zip(queries, query_texts))[:20]:
        fn(conn, mode, q, t)
    lat, recall = [], []
    for n, (q, t) in enumerate(zip(queries, query_texts)):
        started = time.perf_counter()
        rows = fn(conn, mode, q, t)
        lat.append((time.perf_counter() - started) * 1000)
        got = [r[0] for r in rows]
        if mode == "vector":
            recall.append(len(set(got) & exact_vec[n]) / K)
            if recall[-1] < 0.5 and os.environ.get("SEARCH_BENCH_DEBUG"):
                mine = [float(1 - vectors[i - 1] @ q) for i in got]
                best = sorted(float(1 - vectors[i - 1] @ q) for i in exact_cand[n][:K])
                print(f"    query {n}: recall {recall[-1]}, {len(got)} rows, distances {min(mine, default=0):.3f}..{max(mine, default=0):.3f}, exact {best[0]:.3f}..{best[-1]:.3f}", flush=True)
        else:
            recall.append(len(set(got) & exact_hybrid(conn, n, t)) / K)
    conn.close()
    p50, p99 = np.percentile(lat, [50, 99])
    return p50, p99, float(np.mean(recall)), min(recall)


_hybrid_cache = {}


def exact_hybrid(conn, n, text):
    """The fusion the API computes, over the exact vector candidates."""
    if n not in _hybrid_cache:
        kw = conn.execute(pg("WITH " + EXACT_KEYWORD + " SELECT id, r FROM keyword"), params(text, collection, candidates)).fetchall()
        vec = {cid: r + 1 for r, cid in enumerate(exact_cand[n])}
        kwr = dict(kw)
        score = {cid: (1 / (RRF_K + vec[cid]) if cid in vec else 0) + (1 / (RRF_K + kwr[cid]) if cid in kwr else 0)
                 for cid in set(vec) | set(kwr)}
        _hybrid_cache[n] = set(sorted(score, key=lambda c: (-score[c], c))[:K])
    return _hybrid_cache[n]


if __name__ == "__main__":
    results = []
    for mode in ("vector", "hybrid"):
        for shape in args.shapes.split(","):
            p50, p99, rec, rmin = run(shape, mode)
            results.append((mode, shape, p50, p99, rec, rmin))
            print(f"  {mode:6} {shape:6} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  recall@{K} {rec:.3f} (min {rmin:.1f})", flush=True)
    print()
    print(f"{N:,} chunks ({int(mask.sum()):,} in the searched collection), {QUERIES} queries, k = {K}, "
          f"load {build['load_s']:.0f} s, HNSW builds {build['index_s']:.0f} s; table {sizes['table'][0]}, "
          f"HNSW index (halfvec) {sizes['hnsw'][0]}, all indexes on chunks {sizes['all indexes'][0]}; shared_buffers {shared_buffers}\n")
    print(f"| search | SQL shape | p50 ms | p99 ms | recall@{K} (mean) | min |")
    print("|---|---|---:|---:|---:|---:|")
    for mode, shape, p50, p99, rec, rmin in results:
        print(f"| {mode} | {shape} | {p50:.2f} | {p99:.2f} | {rec:.3f} | {rmin:.1f} |")
    if not args.keep:
        db.close()
        with psycopg.connect(f"{PG}/postgres", autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
