"""A ROWS-row table patched twice in the same run: once by one plain UPDATE, once by a `patch`
job (execute: batches of about 200 ms, each copying before-images into a snapshot table and
recording a checkpoint). Same rows, same statement, identical copies of the table. Prints
rows/s, the ratio and the longest lock each holds (the plain UPDATE holds its row locks for its
whole run; a patch from a batch's change to its commit, the rows being found beforehand
without locks), and checks both tables end up identical. Both tables live in the tenant's
schema and belong to its role, and the plain UPDATE runs as that role, as the job's batches do."""

import json, os, subprocess, sys, time, urllib.request, uuid

from bench_target import Databases, psql
from procs import tenant_key

ROWS = int(sys.argv[1])
BIN = os.environ["CONVEYOR_BENCH_BIN"]
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DATABASES = Databases(PG, "conveyor_bench_patch")
PORT = 18081
# One prefix for the API and the worker: they must share the queues.
PREFIX = f"bench:{uuid.uuid4().hex[:8]}"
STATEMENT = "UPDATE {table} SET val = val + 1, note = note || ' patched' WHERE grp IN (2, 5)"


def env():
    e = dict(os.environ)
    e.update(DATABASES.env(),
             CONVEYOR_REDIS_PREFIX=PREFIX,
             CONVEYOR_LISTEN=f"127.0.0.1:{PORT}", CONVEYOR_QUEUES="patch=1", RUST_LOG="warn")
    return e


def request(method, path, key, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}",
                                          "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def checksum(table, tenant_url):
    return psql(f"SELECT md5(string_agg(md5(t::text), '' ORDER BY id)) FROM {table} t",
                tenant_url)


def main():
    DATABASES.create()
    api_bin = os.path.join(BIN, "conveyor-api")
    subprocess.run([api_bin, "migrate"], env=env(), check=True)
    # Also provisions the tenant's role and schema on the target, where the tables go.
    key = tenant_key(api_bin, "bench", env())
    tenant_url = DATABASES.as_tenant(DATABASES.tenant("bench"))
    admin = DATABASES.url()
    print(f"seeding {ROWS:,} rows twice ...", flush=True)
    psql(f"""CREATE TABLE items (id bigint PRIMARY KEY, grp int NOT NULL, val int NOT NULL,
                                 note text, updated_at timestamptz NOT NULL DEFAULT now());
             INSERT INTO items (id, grp, val, note)
                 SELECT i, i % 10, i, 'row ' || i FROM generate_series(1, {ROWS}) i;
             CREATE TABLE plain (LIKE items INCLUDING ALL);
             INSERT INTO plain SELECT * FROM items;""", tenant_url)
    for table in ("items", "plain"):
        psql(f"VACUUM ANALYZE {table}", tenant_url)
    rows = int(psql("SELECT count(*) FROM items WHERE grp IN (2, 5)", tenant_url))

    psql("CHECKPOINT", admin)
    t0 = time.time()
    psql(STATEMENT.format(table="plain"), tenant_url)
    plain_s = time.time() - t0

    api = subprocess.Popen([api_bin], env=env())
    worker = None
    try:
        time.sleep(1.5)
        worker = subprocess.Popen([os.path.join(BIN, "conveyor-worker")], env=env())
        psql("CHECKPOINT", admin)
        job = request("POST", "/v1/jobs", key, {"kind": "patch", "payload": {
            "sql": STATEMENT.format(table="items"), "mode": "execute"}})
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.25)
            job = request("GET", f"/v1/jobs/{job['id']}", key)
        if job["status"] != "succeeded":
            sys.exit(f"patch job {job['status']}: {job.get('error')}")
        result = job["result"]
    finally:
        for p in (worker, api):
            if p:
                p.terminate()
                p.wait()
    same = checksum("items", tenant_url) == checksum("plain", tenant_url)
    patch_s = result["elapsed_ms"] / 1000
    plain_rate, patch_rate = rows / plain_s, result["rows"] / patch_s
    print(f"\n{ROWS:,}-row table, {rows:,} rows changed; tables identical after both: {same}\n")
    print("| method | rows | seconds | rows/s | vs plain | longest lock held |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| plain UPDATE (one statement) | {rows:,} | {plain_s:.2f} | {plain_rate:,.0f} | "
          f"1.00x | {plain_s * 1000:,.0f} ms (whole statement) |")
    print(f"| patch execute, {result['batches']} batches, snapshots + checkpoints | "
          f"{result['rows']:,} | {patch_s:.2f} | {patch_rate:,.0f} | "
          f"{patch_rate / plain_rate:.2f}x | {result['longest_lock_ms']:,.0f} ms (longest batch's "
          f"change → commit; whole batch {result['longest_batch_ms']:,.0f} ms) |")
    if not same or result["rows"] != rows:
        sys.exit("the patched table differs from the plain statement's result")
    DATABASES.drop()


if __name__ == "__main__":
    main()
