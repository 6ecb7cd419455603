"""Drains N no-op jobs with 1 and 2 API processes and 1, 2 and 4 worker processes (64 slots
each). The jobs are submitted through the API processes in turn before the workers start; one
SSE client per API process follows the tenant's stream, and the delay of each `succeeded`
event (received minus the event's own time) is its SSE delay. CPU seconds per process come
from /proc, divided by the drain's span: the cores each part used. Prints a table."""

import datetime, json, os, statistics, subprocess, sys, threading, time, urllib.parse, urllib.request, uuid

from procs import cpu_seconds, server_pids, tenant_key, wait_ready

N = int(sys.argv[1])
ROOT = os.getcwd()
BIN = os.environ.get("BENCH_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
DB = "conveyor_bench_scale"
PG_PORT = urllib.parse.urlsplit(PG).port or 5432
PREFIX = f"bench:{uuid.uuid4().hex[:8]}"
PORTS = (18091, 18092)


def psql(sql, db=f"{PG}/postgres"):
    return subprocess.run(["psql", db, "-tAqc", sql], check=True, capture_output=True, text=True).stdout.strip()


def env(port=PORTS[0]):
    e = dict(os.environ, CONVEYOR_DATABASE_URL=f"{PG}/{DB}", CONVEYOR_REDIS_PREFIX=PREFIX,
             CONVEYOR_LISTEN=f"127.0.0.1:{port}", CONVEYOR_BODY_LIMIT=str(8 << 20), RUST_LOG="warn")
    return e


def post(port, path, key, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def follow(port, key, delays, stop):
    """Collects the delay (ms) of every `succeeded` event on the tenant's stream."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/events", headers={"Authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=120) as stream:
        for line in stream:
            if stop.is_set():
                return
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if event.get("type") == "succeeded":
                at = datetime.datetime.fromisoformat(event["at"].replace("Z", "+00:00")).timestamp()
                delays.append((time.time() - at) * 1000)


def start_api(port):
    api = subprocess.Popen([f"{BIN}/conveyor-api", "serve"], env=env(port))
    wait_ready(port)
    return api


def run(key, apis, workers):
    dburl = f"{PG}/{DB}"
    psql("TRUNCATE jobs", dburl)
    servers = [start_api(port) for port in PORTS[:apis]]
    delays, stop = [], threading.Event()
    for port in PORTS[:apis]:
        threading.Thread(target=follow, args=(port, key, delays, stop), daemon=True).start()
    time.sleep(0.5)
    for i, start in enumerate(range(0, N, 1000)):
        batch = [{"kind": "canary", "payload": {}}] * min(1000, N - start)
        post(PORTS[i % apis], "/v1/jobs/batch", key, {"jobs": batch})
    parts = {"API": [s.pid for s in servers], "PostgreSQL": server_pids(PG_PORT), "Redis": server_pids(6379)}
    before = {name: cpu_seconds(p) for name, p in parts.items()}
    procs = [subprocess.Popen([f"{BIN}/conveyor-worker", "--queues", "canary=64"], env=env()) for _ in range(workers)]
    parts["workers"] = [p.pid for p in procs]
    before["workers"] = 0.0
    while int(psql("SELECT count(*) FROM jobs WHERE status = 'succeeded'", dburl)) < N:
        time.sleep(0.2)
    parts["PostgreSQL"] = server_pids(PG_PORT)  # with the backends opened meanwhile
    used = {name: cpu_seconds(p) - before.get(name, 0.0) for name, p in parts.items()}
    span = float(psql("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs", dburl))
    time.sleep(0.5)
    stop.set()
    for p in procs + servers:
        p.terminate()
    for p in procs + servers:
        p.wait()
    q = statistics.quantiles(delays, n=100) if len(delays) > 1 else [float("nan")] * 99
    return N / span, q[49], q[98], {name: used[name] / span for name in used}


def main():
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    psql(f"CREATE DATABASE {DB}")
    rows = []
    try:
        key = tenant_key(f"{BIN}/conveyor-api", "scale", env())
        for apis in (1, 2):
            for workers in (1, 2, 4):
                rows.append((apis, workers) + run(key, apis, workers))
    finally:
        psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        subprocess.run(f"redis-cli --scan --pattern '{PREFIX}:*' | xargs -r redis-cli del > /dev/null", shell=True)
    print(f"\nscale benchmark: {N} no-op jobs drained (first start to last finish), {os.cpu_count()} cores\n")
    print("| API processes | worker processes (x 64) | jobs/s | SSE delay p50 | p99 | cores: API | workers | PostgreSQL | Redis |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for apis, workers, rate, p50, p99, cores in rows:
        print(f"| {apis} | {workers} | {rate:,.0f} | {p50:,.0f} ms | {p99:,.0f} ms | {cores['API']:.2f} | "
              f"{cores['workers']:.2f} | {cores['PostgreSQL']:.2f} | {cores['Redis']:.2f} |")
    print()


main()
