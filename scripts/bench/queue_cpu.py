"""Where a drain's CPU goes: N no-op canary jobs submitted (batches of 1,000), then W worker
processes x 64 (BENCH_CONCURRENCY=C: x C) drain them; per build (BENCH_BIN and BENCH_BASELINE,
alternating, ROUNDS times each), the drain rate and the CPU seconds PostgreSQL, the workers and
Redis spent during the drain (from /proc: the servers listening on their ports, with their children, and the
worker processes), PostgreSQL's work per job during the drain: row versions written
(inserted, updated, deleted, over every table) and WAL bytes, and the jobs whose attempt is
not 1 (run twice, or not at all).
Prints a table. BENCH_FLOOR=1: also, per round, the floor of this build's schema: no
worker, two psql sessions write only each job's two durable changes (the claim's update, then
a bare finish), 64 (C) jobs a statement, each statement prepared once and its own commit.
BENCH_PERF=FILE: also a system-wide `perf record -g` of each drain, to
FILE.<build>.<run> (read with `perf report -i FILE... --sort comm,dso,sym`)."""

import json, os, subprocess, sys, time, urllib.request, uuid
from urllib.parse import urlsplit

from procs import cpu_seconds, server_pids, tenant_key, wait_ready

N, W, ROUNDS = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
PG = os.environ["BENCH_PG"]
PG_PORT = urlsplit(PG).port or 5432
BUILDS = [(name, os.environ[var]) for name, var in (("baseline", "BENCH_BASELINE"), ("this build", "BENCH_BIN"))
          if os.environ.get(var)]
DB, PORT = "conveyor_bench_cpu", 18091
# Slots per worker process, and so the most jobs one claim or finish carries.
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "64"))


def psql(sql, db=f"{PG}/postgres"):
    return subprocess.run(["psql", db, "-tAqc", sql], check=True, capture_output=True, text=True).stdout.strip()


def env(prefix):
    e = dict(os.environ)
    e.update(CONVEYOR_DATABASE_URL=f"{PG}/{DB}", CONVEYOR_REDIS_PREFIX=prefix, RUST_LOG="error",
             CONVEYOR_LISTEN=f"127.0.0.1:{PORT}", CONVEYOR_BODY_LIMIT=str(8 << 20))
    return e


def pg_work():
    """Rows written over every table of the database, and WAL bytes, so far."""
    rows = psql("SELECT sum(n_tup_ins + n_tup_upd + n_tup_del) FROM pg_stat_user_tables", f"{PG}/{DB}")
    wal = psql("SELECT wal_bytes FROM pg_stat_wal")
    return int(rows or 0), int(float(wal))


def forget(prefix):
    """Deletes a drain's Redis keys: left behind, each run's messages and events piled up
    (gigabytes over a day of runs) and the tests' `KEYS` scans then blocked Redis for seconds."""
    keys = subprocess.run(["redis-cli", "--scan", "--pattern", f"{prefix}:*"], check=True, capture_output=True,
                          text=True).stdout.split()
    for start in range(0, len(keys), 1000):
        subprocess.run(["redis-cli", "unlink", *keys[start:start + 1000]], check=True, capture_output=True)


def floor_sessions():
    """Two psql sessions that claim and finish every queued job, 64 a statement: the least
    PostgreSQL work a drain that records both changes durably can do on this schema. Each
    statement is prepared once and planned once per session, as the workers' are."""
    ids = psql("SELECT id FROM jobs WHERE status = 'queued' ORDER BY id", f"{PG}/{DB}").split()
    batches = [ids[i:i + CONCURRENCY] for i in range(0, len(ids), CONCURRENCY)]
    prepare = [
        "PREPARE claim(uuid[]) AS UPDATE jobs SET status = 'running', attempt = attempt + 1, worker = 'floor',"
        " progress = 0, message = NULL, started_at = now(), updated_at = now()"
        " WHERE id = ANY ($1) AND status = 'queued' AND NOT cancel_requested RETURNING jobs.*;",
        "PREPARE finish(uuid[]) AS UPDATE jobs SET status = 'succeeded', result = '{}', progress = 1,"
        " worker = NULL, finished_at = now(), updated_at = now() WHERE id = ANY ($1) AND status = 'running';",
    ]
    sessions = []
    for half in (batches[0::2], batches[1::2]):
        script = list(prepare)
        for batch in half:
            array = "'{" + ",".join(batch) + "}'"
            script += [f"EXECUTE claim({array});", f"EXECUTE finish({array});"]
        session = subprocess.Popen(["psql", f"{PG}/{DB}", "-tAq", "-o", "/dev/null"], stdin=subprocess.PIPE,
                                   text=True, env=dict(os.environ, PGOPTIONS="-c plan_cache_mode=force_generic_plan"))
        sessions.append((session, "\n".join(script) + "\n"))
    # Left open until the drain is measured: a backend's CPU is read while it lives.
    for session, script in sessions:
        session.stdin.write(script)
        session.stdin.flush()
    return [session for session, _ in sessions]


def drain(bin_dir, profile=None, floor=False):
    prefix = f"bench:{uuid.uuid4().hex[:8]}"
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    psql(f"CREATE DATABASE {DB}")
    subprocess.run([f"{bin_dir}/conveyor-api", "migrate"], env=env(prefix), check=True, capture_output=True)
    key = tenant_key(f"{bin_dir}/conveyor-api", "bench", env(prefix))
    api = subprocess.Popen([f"{bin_dir}/conveyor-api", "serve"], env=env(prefix))
    try:
        wait_ready(PORT)
        for start in range(0, N, 1000):
            body = json.dumps({"jobs": [{"kind": "canary", "payload": {}}] * min(1000, N - start)}).encode()
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{PORT}/v1/jobs/batch", data=body, method="POST",
                headers={"Authorization": f"Bearer {key}", "content-type": "application/json"}), timeout=60).read()
        # Statistics of the backlog as drained, as `queue_bench.py` takes them: 07477c5 plans its
        # claims from them, and drained a fifth slower, its PostgreSQL CPU up by a third, in the
        # runs where autovacuum had not analyzed the new backlog yet.
        psql("ANALYZE jobs", f"{PG}/{DB}")
        # Idle backends report their statistics within 10 s: the submissions' rows are in.
        time.sleep(11)
        work = pg_work()
        servers = {"postgres": server_pids(PG_PORT), "redis": server_pids(6379)}
        before = {name: cpu_seconds(pids) for name, pids in servers.items()}
        perf = profile and subprocess.Popen(["perf", "record", "-a", "-g", "-F", "499", "-q", "-o", profile],
                                            stdout=subprocess.DEVNULL)
        workers = floor_sessions() if floor else [
            subprocess.Popen([f"{bin_dir}/conveyor-worker", "--queues", f"canary={CONCURRENCY}"], env=env(prefix))
            for _ in range(W)]
        # One connection polls, so the poll's own backends do not count as the drain's.
        poll = subprocess.Popen(["psql", f"{PG}/{DB}", "-tAq"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        while True:
            poll.stdin.write("SELECT count(*) FROM jobs WHERE status = 'succeeded';\n")
            poll.stdin.flush()
            if int(poll.stdout.readline()) >= N:
                break
            time.sleep(0.2)
        if perf:
            perf.send_signal(2)
            perf.wait()
        servers["postgres"] = server_pids(PG_PORT)  # with the backends opened meanwhile
        used = {name: cpu_seconds(pids) - before.get(name, 0.0) for name, pids in servers.items()}
        used["workers"] = cpu_seconds(w.pid for w in workers)
        poll.stdin.close()
        poll.wait()
        for w in workers:
            w.terminate()
        for w in workers:
            w.wait()
    finally:
        api.terminate()
        api.wait()
        forget(prefix)
    time.sleep(1)  # the exited backends' statistics
    rows, wal = (after - before for after, before in zip(pg_work(), work))
    span = float(psql("SELECT extract(epoch FROM max(finished_at) - min(started_at)) FROM jobs", f"{PG}/{DB}"))
    # Each job ran one attempt: none was claimed twice.
    twice = int(psql("SELECT count(*) FROM jobs WHERE attempt <> 1", f"{PG}/{DB}"))
    return N / span, used["postgres"], used["workers"], used["redis"], rows / N, wal / N, twice


def main():
    results = {name: [] for name, _ in BUILDS}
    perf = os.environ.get("BENCH_PERF")
    floor = os.environ.get("BENCH_FLOOR") == "1"
    if floor:
        results["floor: the two row writes alone"] = []
    for run in range(1, ROUNDS + 1):
        for name, bin_dir in BUILDS:
            profile = perf and f"{perf}.{name.replace(' ', '-')}.{run}"
            results[name].append(drain(bin_dir, profile))
        if floor:
            results["floor: the two row writes alone"].append(drain(BUILDS[-1][1], floor=True))
    psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    print(f"| {N:,} no-op jobs, {W} worker process(es) x {CONCURRENCY} | jobs/s | PostgreSQL CPU s | workers CPU s"
          " | Redis CPU s | rows written per job | WAL bytes per job | jobs not run exactly once |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in results.items():
        for i, (rate, pg, worker, redis, rows, wal, twice) in enumerate(runs, 1):
            print(f"| {name}, run {i} | {rate:,.0f} | {pg:.2f} | {worker:.2f} | {redis:.2f} | {rows:.2f} | {wal:,.0f}"
                  f" | {twice} |")
    if "baseline" in results and "this build" in results:
        base = sum(r[0] for r in results["baseline"]) / ROUNDS
        this = sum(r[0] for r in results["this build"]) / ROUNDS
        print(f"\nthis build / baseline, mean drain rate: {this / base:.2f}x")
    if floor:
        mean = {name: sum(r[0] for r in runs) / ROUNDS for name, runs in results.items()}
        for name, rate in mean.items():
            if not name.startswith("floor"):
                print(f"floor / {name}, mean drain rate: {mean['floor: the two row writes alone'] / rate:.2f}x")


main()
