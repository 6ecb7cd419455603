"""Generates a ROWS-row, 10-column CSV (ints, floats, text, timestamps, NULLs) and the same rows
as NDJSON and Parquet, uploads them (not timed), then imports them through the platform (submit
→ succeeded) and the CSV with `psql -c "\\copy ..."` into an identical table, both in the
tenant's schema as the tenant's role: the direct path (typed CSV) twice beside two `\\copy`
rounds, then the checked paths (`on_error=skip`, inferred types, NDJSON, Parquet). Prints rows/s,
each against the best `\\copy`, and the worker's peak RSS."""

import json, os, random, subprocess, sys, time, urllib.request, uuid

from bench_target import Databases, psql
from procs import tenant_key

ROWS = int(sys.argv[1])
ROOT = os.getcwd()
BIN = os.environ.get("BENCH_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DATABASES = Databases(PG, "conveyor_bench")
PORT = 18081
# One prefix for the API and the worker: they must share the queues.
PREFIX = f"bench:{uuid.uuid4().hex[:8]}"
COLUMNS = [("id", "bigint"), ("customer", "integer"), ("amount", "double precision"),
           ("discount", "double precision"), ("name", "text"), ("city", "text"),
           ("created", "timestamptz"), ("updated", "timestamp"), ("quantity", "bigint"),
           ("note", "text")]
CITIES = ["Lisbon", "Oslo", "Zürich", "São Paulo", "Kyoto", "Nairobi", "Austin, TX"]


def generate(path):
    rnd = random.Random(7)
    with open(path, "w") as f:
        f.write(",".join(c for c, _ in COLUMNS) + "\n")
        for i in range(ROWS):
            note = "" if i % 7 == 0 else f"\"note {i}, with comma\""
            discount = "" if i % 5 == 0 else f"{rnd.random():.4f}"
            f.write(f"{i},{rnd.randrange(100000)},{rnd.random() * 1000:.2f},{discount},"
                    f"customer {rnd.randrange(10**6)},\"{CITIES[i % len(CITIES)]}\","
                    f"2024-{1 + i % 12:02d}-{1 + i % 28:02d} {i % 24:02d}:{i % 60:02d}:{i % 60:02d}+00,"
                    f"2024-{1 + i % 12:02d}-{1 + i % 28:02d} 12:00:00,{i % 1000},{note}\n")


def generate_ndjson(csv_path, path):
    """The CSV's rows as JSON objects: numbers as numbers, NULL as null, timestamps as text."""
    import csv
    numeric = {c: (int if t in ("bigint", "integer") else float)
               for c, t in COLUMNS if t in ("bigint", "integer", "double precision")}
    with open(csv_path, newline="") as src, open(path, "w") as out:
        for row in csv.DictReader(src):
            out.write(json.dumps({c: (None if v == "" else numeric[c](v) if c in numeric else v)
                                  for c, v in row.items()}, ensure_ascii=False) + "\n")


def generate_parquet(csv_path, path):
    """The CSV's rows in Parquet with native types (timestamps as timestamps), by pyarrow."""
    import pyarrow as pa, pyarrow.csv as pacsv, pyarrow.parquet as pq
    types = {"bigint": pa.int64(), "integer": pa.int32(), "double precision": pa.float64(),
             "text": pa.string(), "timestamptz": pa.timestamp("us", tz="UTC"), "timestamp": pa.timestamp("us")}
    options = pacsv.ConvertOptions(column_types={c: types[t] for c, t in COLUMNS},
                                   strings_can_be_null=True, quoted_strings_can_be_null=False)
    pq.write_table(pacsv.read_csv(csv_path, convert_options=options), path, row_group_size=100_000)


def cached(path, make):
    if not os.path.exists(path):
        print(f"generating {os.path.basename(path)} ...", file=sys.stderr)
        make(path + ".tmp")
        os.rename(path + ".tmp", path)
    return path


def upload(path, name, key):
    with open(path, "rb") as f:
        req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/datasets?name={name}", data=f,
                                     method="POST", headers={"Authorization": f"Bearer {key}",
                                                             "Content-Length": str(os.path.getsize(path))})
        try:
            with urllib.request.urlopen(req, timeout=3600) as r:
                return json.loads(r.read())["id"]
        except urllib.error.HTTPError as e:
            sys.exit(f"upload {name}: {e.code} {e.read().decode()}")


def platform_import(key, payload, tenant_url):
    """Submit → succeeded, in seconds; every row must be there and none rejected."""
    t0 = time.perf_counter()
    job = request("POST", "/v1/jobs", key, {"kind": "import", "payload": payload})
    while True:
        job = request("GET", f"/v1/jobs/{job['id']}", key)
        if job["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    assert job["status"] == "succeeded", job
    count = psql(f"SELECT count(*) FROM {payload['target']['table']}", tenant_url)
    assert int(count) == ROWS, count
    assert job["result"].get("rows_rejected", 0) == 0, job["result"]
    return seconds


def env():
    e = dict(os.environ)
    e.update(DATABASES.env(),
             CONVEYOR_REDIS_PREFIX=PREFIX,
             CONVEYOR_LISTEN=f"127.0.0.1:{PORT}", CONVEYOR_DATA_DIR=os.path.join(ROOT, ".data/bench-objects"),
             RUST_LOG="warn")
    return e


def request(method, path, key, body=None, raw=None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        sys.exit(f"{method} {path}: {e.code} {e.read().decode()}")


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024


def main():
    os.makedirs(".data/bench", exist_ok=True)
    path = cached(os.path.abspath(f".data/bench/import_{ROWS}.csv"), generate)
    ndjson = cached(os.path.abspath(f".data/bench/import_{ROWS}.ndjson"), lambda p: generate_ndjson(path, p))
    parquet = cached(os.path.abspath(f".data/bench/import_{ROWS}.parquet"), lambda p: generate_parquet(path, p))
    size_mb = os.path.getsize(path) / 1e6
    DATABASES.create()
    subprocess.run([f"{BIN}/conveyor-api", "migrate"], env=env(), check=True)
    # Also provisions the tenant's role and schema on the target.
    key = tenant_key(f"{BIN}/conveyor-api", "bench", env())
    tenant_url = DATABASES.as_tenant(DATABASES.tenant("bench"))
    api = subprocess.Popen([f"{BIN}/conveyor-api", "serve"], env=env())
    worker = subprocess.Popen([f"{BIN}/conveyor-worker", "--queues", "import=1"], env=env())
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        datasets = {"csv": upload(path, "bench.csv", key), "ndjson": upload(ndjson, "bench.ndjson", key),
                    "parquet": upload(parquet, "bench.parquet", key)}
        ddl = ", ".join(f"{c} {t}" for c, t in COLUMNS)
        typed = [{"source": c, "type": t} for c, t in COLUMNS]
        results = []
        for round_ in range(2):
            table = f"psql_copy_{round_}"
            psql(f"CREATE TABLE {table} ({ddl})", tenant_url)
            t0 = time.perf_counter()
            subprocess.run(["psql", tenant_url, "-qc", f"\\copy {table} FROM '{path}' WITH (FORMAT csv, HEADER true)"], check=True)
            psql_s = time.perf_counter() - t0
            payload = {"dataset_id": datasets["csv"], "target": {"table": f"platform_{round_}"}, "columns": typed}
            results.append((psql_s, platform_import(key, payload, tenant_url)))
        checked = [
            ("CSV, typed, on_error=skip", {"dataset_id": datasets["csv"], "columns": typed, "on_error": "skip"}),
            ("CSV, types inferred (create)", {"dataset_id": datasets["csv"]}),
            ("NDJSON, typed", {"dataset_id": datasets["ndjson"], "columns": typed}),
            ("Parquet, typed", {"dataset_id": datasets["parquet"], "columns": typed}),
        ]
        checked_results = []
        for i, (label, payload) in enumerate(checked):
            payload["target"] = {"table": f"checked_{i}"}
            checked_results.append((label, platform_import(key, payload, tenant_url)))
        rss = peak_rss_mb(worker.pid)
    finally:
        api.terminate(); worker.terminate(); api.wait(); worker.wait()
        DATABASES.drop()
    print(f"\nimport of {ROWS:,} rows x 10 columns ({size_mb:,.0f} MB CSV), upload excluded\n")
    print("| round | psql \\copy rows/s | platform rows/s | platform / psql |")
    print("|---:|---:|---:|---:|")
    for i, (p, c) in enumerate(results):
        print(f"| {i + 1} | {ROWS / p:,.0f} | {ROWS / c:,.0f} | {p / c:.2f}x |")
    best_p, best_c = min(r[0] for r in results), min(r[1] for r in results)
    print(f"| best | {ROWS / best_p:,.0f} | {ROWS / best_c:,.0f} | {best_p / best_c:.2f}x |")
    print(f"\n| checked path (same rows) | rows/s | / best psql \\copy |")
    print("|---|---:|---:|")
    for label, seconds in checked_results:
        print(f"| {label} | {ROWS / seconds:,.0f} | {best_p / seconds:.2f}x |")
    print(f"\nworker peak RSS over all imports: {rss:.0f} MB")


main()
