"""What the benchmarks that run the platform share: waiting for an API process to be ready, a
tenant's key, and the CPU seconds of processes (a server and its children) read from /proc."""

import os, subprocess, time, urllib.request

TICK = os.sysconf("SC_CLK_TCK")


def wait_ready(port, tries=100):
    """Until the API on loopback `port` answers `/readyz` (at most `tries` tenths of a second)."""
    for _ in range(tries):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz")
            return
        except Exception:
            time.sleep(0.1)


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total / TICK


def server_pids(port):
    """The process listening on loopback `port` and its children (PostgreSQL's backends)."""
    out = subprocess.run(["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True).stdout
    pids = {int(p.split("=")[1]) for p in out.replace(",", " ").split() if p.startswith("pid=")}
    for pid in list(pids):
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        pids.update(int(c) for c in children)
    return sorted(pids)


def tenant_key(api_bin, tenant, env):
    """A key of `tenant`, made with it if it is new (`--new-tenant`; binaries from before that flag
    made a tenant from its name alone)."""
    def create(*extra):
        return subprocess.run([api_bin, "keys", "create", "--tenant", tenant, *extra], env=env,
                              capture_output=True, text=True)
    done = create()
    if done.returncode != 0 and "add --new-tenant" in done.stderr:
        done = create("--new-tenant")
    if done.returncode != 0:
        raise RuntimeError(f"keys create --tenant {tenant}: {done.stderr.strip()}")
    return done.stdout.strip()
