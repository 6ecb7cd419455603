# shellcheck shell=bash
# Sourced by the benchmarks that run the platform themselves (scripts/bench/sse and ingest):
# private copies of the release binaries, their own database and Redis prefix, the API started
# and answering, and everything stopped and removed on exit.
#
# Set before sourcing: `name` (names the database and prefix), `port` (default listen port;
# BENCH_PORT overrides) and `examples` (conveyor-cli examples the benchmark runs, maybe none).
# Sets: `bin`, `key` (an API key of tenant "bench"), `api` (the API's pid). Then
# `start_worker QUEUES` starts a worker.
pg=$(scripts/services)   # the PostgreSQL the platform runs on (pgvector)
bin=$(mktemp -d)
if [ -n "${BENCH_BIN:-}" ]; then
  # Release builds made beforehand.
  for tool in conveyor-api conveyor-worker "${examples[@]}"; do cp "$BENCH_BIN/$tool" "$bin/"; done
else
  echo "bench $name: building (release)" >&2
  built=$(scripts/build "${examples[@]}")
  # Private copies: a shared target directory may be rebuilt by someone else mid-run.
  cp "$built/conveyor-api" "$built/conveyor-worker" "$bin/"
  for example in "${examples[@]}"; do cp "$built/examples/$example" "$bin/"; done
fi

db=conveyor_bench_${name}_$$
prefix=bench-$name-$$
port=${BENCH_PORT:-$port}
export CONVEYOR_DATABASE_URL=$pg/$db
# Its own default target, set up as in production (SECURITY.md): bootstrapped by the superuser,
# reached as conveyor_platform, tenants provisioned by conveyor_provisioner.
target_host=${pg#postgres://postgres@}
export CONVEYOR_TARGET_DATABASE_URL=postgres://conveyor_platform@$target_host/${db}_target
export CONVEYOR_TARGET_PROVISION_URL=postgres://conveyor_provisioner@$target_host/${db}_target
export CONVEYOR_REDIS_URL=${CONVEYOR_REDIS_URL:-redis://127.0.0.1:6379}
export CONVEYOR_REDIS_PREFIX=$prefix
export CONVEYOR_LISTEN=127.0.0.1:$port
export RUST_LOG=warn

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Tenant roles are the server's: removed with the databases.
  local tenants
  tenants=$(psql "$pg/$db" -tAqc "SELECT replace(id::text, '-', '') FROM tenants" 2>/dev/null || true)
  for d in "${db}_target" "$db"; do
    psql "$pg/postgres" -qc "DROP DATABASE IF EXISTS $d WITH (FORCE)" >/dev/null 2>&1 || true
  done
  for t in $tenants; do
    psql "$pg/postgres" -qc "DROP ROLE IF EXISTS conveyor_t_$t" >/dev/null 2>&1 || true
  done
  redis-cli --scan --pattern "$prefix:*" | xargs -r -n 500 redis-cli del >/dev/null || true
  rm -rf "$bin"
}
trap cleanup EXIT INT TERM

psql "$pg/postgres" -qc "CREATE DATABASE $db" >/dev/null
psql "$pg/postgres" -qc "CREATE DATABASE ${db}_target" >/dev/null
PGOPTIONS='-c client_min_messages=warning' psql "$pg/${db}_target" -qX -v ON_ERROR_STOP=1 \
  -f shared/sql/target-bootstrap.sql >/dev/null

start_worker() {
  "$bin/conveyor-worker" --queues "$1" & pids+=("$!")
}

"$bin/conveyor-api" migrate 2>/dev/null
key=$("$bin/conveyor-api" keys create --tenant bench --new-tenant)
"$bin/conveyor-api" serve & api=$!; pids+=("$api")
for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
