# Named queue_bench, not queue: a queue.py here would shadow the standard library for redis-py.
"""Drains N no-op jobs through Conveyor (1 and 2 worker processes) and through Celery on the
same Redis, and through a baseline build (BENCH_BASELINE: a directory with `conveyor-api` and
`conveyor-worker` of another commit, run on a database of its own); measures a late tenant's
start delay while another tenant's backlog drains, and single-submit latency at a steady
500 req/s (three times). Prints tables."""

import json, os, statistics, subprocess, sys, tempfile, time, urllib.request, uuid
from urllib.parse import urlsplit

from procs import tenant_key, wait_ready
from wire import Relay

N = int(sys.argv[1])
ROOT = os.getcwd()
BIN = os.environ.get("BENCH_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
PG = os.environ.get("BENCH_PG", "postgres://postgres@127.0.0.1:5432")
ADMIN = f"{PG}/postgres"
DB = "conveyor_bench"
BASELINE = os.environ.get("BENCH_BASELINE")
PORT = 18080
PREFIX = f"bench:{uuid.uuid4().hex[:8]}"


def psql(sql, db=ADMIN):
    return subprocess.run(["psql", db, "-tAqc", sql], check=True, capture_output=True, text=True).stdout.strip()


# Fair dispatch is how workers claim (claim_jobs): there is no setting that turns it off.
MODES = {"fair dispatch on": {}}
MODE = {}


def env():
    e = dict(os.environ)
    e.update(CONVEYOR_DATABASE_URL=f"{PG}/{DB}",
             CONVEYOR_REDIS_PREFIX=PREFIX, CONVEYOR_LISTEN=f"127.0.0.1:{PORT}",
             CONVEYOR_BODY_LIMIT=str(8 << 20), RUST_LOG="warn")
    e.update(MODE)
    return e


def request(method, path, key, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def conveyor_drain(key, workers, concurrency):
    dburl = env()["CONVEYOR_DATABASE_URL"]
    psql("TRUNCATE jobs", dburl)
    t0 = time.time()
    for start in range(0, N, 1000):
        jobs = [{"kind": "canary", "payload": {}} for _ in range(min(1000, N - start))]
        request("POST", "/v1/jobs/batch", key, {"jobs": jobs})
    submit_s = time.time() - t0
    # Statistics of the backlog as drained, not of whatever the table held when autovacuum last
    # looked: 07477c5 plans its claims from them, and drained half as fast with two workers in
    # the runs where they still described the drained table of the drain before.
    psql("ANALYZE jobs", dburl)
    procs = [subprocess.Popen([f"{bin_dir()}/conveyor-worker", "--queues", f"canary={concurrency}"], env=env())
             for _ in range(workers)]
    while int(psql("SELECT count(*) FROM jobs WHERE status = 'succeeded'", dburl)) < N:
        time.sleep(0.2)
    span = float(psql("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs", dburl))
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()
    return N / submit_s, N / span


def late_tenant(key_a, key_b, backlog, concurrency=64):
    """A's backlog of no-op jobs drains through one worker; meanwhile B submits one job every
    20 ms. Returns B's start delays (started_at - created_at) p50 and p99, in ms."""
    dburl = env()["CONVEYOR_DATABASE_URL"]
    psql("TRUNCATE jobs", dburl)
    for start in range(0, backlog, 1000):
        jobs = [{"kind": "canary", "payload": {}} for _ in range(min(1000, backlog - start))]
        request("POST", "/v1/jobs/batch", key_a, {"jobs": jobs})
    worker = subprocess.Popen([f"{BIN}/conveyor-worker", "--queues", f"canary={concurrency}"], env=env())
    sent = 0
    while sent < 500:
        request("POST", "/v1/jobs", key_b, {"kind": "canary", "payload": {}})
        sent += 1
        time.sleep(0.02)
        if sent % 25 == 0 and int(psql("SELECT count(*) FROM jobs WHERE status <> 'succeeded'", dburl)) <= sent:
            break
    while int(psql("SELECT count(*) FROM jobs WHERE status <> 'succeeded'", dburl)) > 0:
        time.sleep(0.2)
    worker.terminate()
    worker.wait()
    delays = [float(x) for x in psql(
        "SELECT extract(epoch FROM j.started_at - j.created_at) * 1000 FROM jobs j "
        "JOIN tenants t ON t.id = j.tenant_id WHERE t.name = 'late'", dburl).split()]
    q = statistics.quantiles(delays, n=100)
    return len(delays), q[49], q[98]


def submit_latency(key, rate=500, seconds=10):
    """Open-loop single submits from a Rust client (cli/examples/submit_bench.rs): each sent
    on schedule whatever the earlier ones did, so a stall cannot hide behind a slowed client."""
    tool = next(p for p in (f"{BIN}/submit_bench", f"{BIN}/examples/submit_bench") if os.path.exists(p))
    out = subprocess.run([tool, f"http://127.0.0.1:{PORT}", key, str(rate), str(seconds)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    return r["rate"], r["p50_ms"], r["p99_ms"], r["errors"]


CELERY_APP = """
import time, redis
from celery import Celery
app = Celery('bench', broker='redis://127.0.0.1:6379/15')
app.conf.update(task_ignore_result=True, worker_prefetch_multiplier=16, broker_connection_retry_on_startup=True)
r = redis.Redis(db=15)
@app.task
def noop():
    now = time.time()
    r.setnx('first', now)
    r.set('last', now)
    r.incr('done')
"""


def celery_drain():
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "benchapp.py"), "w") as f:
        f.write(CELERY_APP)
    py = os.path.join(ROOT, ".venv/bin/python")
    subprocess.run(["redis-cli", "-n", "15", "FLUSHDB"], check=True, capture_output=True)
    enqueue = f"import benchapp\nfor _ in range({N}): benchapp.noop.delay()"
    subprocess.run([py, "-c", enqueue], cwd=d, check=True)
    worker = subprocess.Popen([py, "-m", "celery", "-A", "benchapp", "worker", "-c", "2", "--loglevel=WARNING"],
                              cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis
    r = redis.Redis(db=15)
    while int(r.get("done") or 0) < N:
        time.sleep(0.2)
    rate = N / (float(r.get("last")) - float(r.get("first")))
    worker.terminate()
    worker.wait()
    r.flushdb()
    return rate


def bin_dir():
    """The build under test: the baseline's while it runs, else this one."""
    return MODE.get("BENCH_BIN", BIN)


def start_api():
    api = subprocess.Popen([f"{bin_dir()}/conveyor-api", "serve"], env=env())
    wait_ready(PORT)
    return api


def stop(proc):
    proc.terminate()
    proc.wait()


def key_for(tenant):
    return tenant_key(f"{bin_dir()}/conveyor-api", tenant, env())


def baseline_drains(rows, celery, cost_rows):
    """The same drains through the baseline build, on its own database (its schema is older)."""
    global DB
    MODE.clear()
    MODE.update(BENCH_BIN=BASELINE)
    own, DB = DB, f"{DB}_baseline"
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    psql(f"CREATE DATABASE {DB}")
    api = None
    try:
        subprocess.run([f"{BASELINE}/conveyor-api", "migrate"], env=env(), check=True, capture_output=True)
        key = key_for("bench")
        api = start_api()
        for workers in (1, 2):
            submit, drain = conveyor_drain(key, workers, 64)
            rows.append((f"baseline ({os.path.basename(BASELINE.rstrip('/'))}), {workers} worker process(es) x 64",
                         drain, drain / celery, submit))
        stop(api)
        api = None
        cost_rows.append(costs(f"baseline ({os.path.basename(BASELINE.rstrip('/'))})"))
    finally:
        if api:
            stop(api)
        psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        DB = own
        MODE.clear()


COST_JOBS = 2000
RELAYS = {}


def costs(label):
    """Per job, from submit to finish (batch submits of 1,000, one worker x 64): what the API
    and the worker send to and receive from PostgreSQL and Redis, through counting relays, and
    the rows PostgreSQL wrote. Runs its own API, so every backend has flushed its statistics."""
    if not RELAYS:
        RELAYS["pg"] = Relay(25433, urlsplit(PG).port or 5432, "postgres")
        RELAYS["redis"] = Relay(26379, 6379, "redis")
    relayed = dict(CONVEYOR_DATABASE_URL=f"postgres://postgres@127.0.0.1:25433/{DB}",
                   CONVEYOR_REDIS_URL="redis://127.0.0.1:26379")
    MODE.update(relayed)
    dburl = f"{PG}/{DB}"
    rows_written = ("SELECT tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
                    f"WHERE datname = '{DB}'")
    key = key_for("costs")
    psql("TRUNCATE jobs", dburl)
    time.sleep(1)
    before = int(psql(rows_written))
    for relay in RELAYS.values():
        relay.reset()
    api = start_api()
    for start in range(0, COST_JOBS, 1000):
        request("POST", "/v1/jobs/batch", key, {"jobs": [{"kind": "canary", "payload": {}}] * 1000})
    worker = subprocess.Popen([f"{bin_dir()}/conveyor-worker", "--queues", "canary=64"], env=env())
    while int(psql("SELECT count(*) FROM jobs WHERE status = 'succeeded'", dburl)) < COST_JOBS:
        time.sleep(0.2)
    stop(worker)
    stop(api)
    time.sleep(1.5)
    written = int(psql(rows_written)) - before
    for k in relayed:
        MODE.pop(k)
    pg, redis = RELAYS["pg"].counts, RELAYS["redis"].counts
    per = lambda x: x / COST_JOBS
    return (label, per(pg.requests), per(written), per(pg.sent + pg.received),
            per(redis.requests), per(redis.sent + redis.received))


def main():
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    psql(f"CREATE DATABASE {DB}")
    api = None
    try:
        key, late_key = key_for("bench"), key_for("late")
        celery = celery_drain()
        rows, late = [], []
        cost_rows = []
        if BASELINE:
            baseline_drains(rows, celery, cost_rows)
        for mode, settings in MODES.items():
            MODE.clear()
            MODE.update(settings)
            api = start_api()
            for workers in (1, 2):
                submit, drain = conveyor_drain(key, workers, 64)
                rows.append((f"conveyor, {mode}, {workers} worker process(es) x 64", drain, drain / celery, submit))
            late.append((mode, late_tenant(key, late_key, N)))
            if mode == "fair dispatch on":
                stop(api)
                cost_rows.append(costs("this build, fair dispatch on"))
                api = start_api()
                # The API alone (workers run on other machines), then with a worker draining the
                # submitted jobs on the same two cores.
                latency = [(f"API alone, run {i}", submit_latency(key)) for i in (1, 2, 3)]
                worker = subprocess.Popen([f"{BIN}/conveyor-worker", "--queues", "canary=16"], env=env())
                latency.append(("API + a worker draining on the same cores", submit_latency(key)))
                stop(worker)
            stop(api)
            api = None
    finally:
        if api:
            stop(api)
        psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
        subprocess.run(f"redis-cli --scan --pattern '{PREFIX}:*' | xargs -r redis-cli del > /dev/null", shell=True)
    print(f"\nqueue benchmark: {N} no-op jobs, end-to-end steady rate (first start to last finish)\n")
    print(f"| system | jobs/s | vs Celery | batch submit jobs/s |")
    print(f"|---|---:|---:|---:|")
    print(f"| celery 2 prefork processes, same Redis | {celery:,.0f} | 1.00x | |")
    for name, drain, ratio, submit in rows:
        print(f"| {name} | {drain:,.0f} | {ratio:.2f}x | {submit:,.0f} |")
    on = [d for n, d, _, _ in rows if "on," in n]
    base = [d for n, d, _, _ in rows if n.startswith("baseline")]
    if base:
        print(f"\nfair dispatch on / baseline drain rate, 1 and 2 workers: " + ", ".join(f"{a / b:.2f}x" for a, b in zip(on, base)))
    print(f"\n| late tenant: 1 job / 20 ms while {N} of another's drain (1 worker x 64) | jobs | start delay p50 | p99 |")
    print("|---|---:|---:|---:|")
    for mode, (count, p50, p99) in late:
        print(f"| {mode} | {count} | {p50:,.0f} ms | {p99:,.0f} ms |")
    print(f"\n| per job ({COST_JOBS} no-op jobs: batch submit, 1 worker x 64) | PostgreSQL statements | "
          "rows written | PostgreSQL bytes | Redis commands | Redis bytes |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, statements, written, pg_bytes, commands, redis_bytes in cost_rows:
        print(f"| {label} | {statements:.1f} | {written:.1f} | {pg_bytes:,.0f} | {commands:.1f} | {redis_bytes:,.0f} |")
    print("\n| single POST /v1/jobs, open loop, 10 s | req/s | p50 | p99 | errors |\n|---|---:|---:|---:|---:|")
    for name, (achieved, p50, p99, errors) in latency:
        print(f"| {name} | {achieved:.0f} | {p50:.2f} ms | {p99:.2f} ms | {errors} |")
    print()


main()
