"""Revokes keys on API process A while process B has each cached (one request made with it)
and a /v1/events stream open with it; measures, from the moment the DELETE is sent, until B
answers 401 and until B's stream closes. Standard library only."""

import http.client, json, statistics, sys, threading, time, urllib.error, urllib.parse, urllib.request

A, B, ADMIN, ROUNDS = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def call(base, method, path, key, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def open_stream(base, key):
    url = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("GET", "/v1/events", headers={"Authorization": f"Bearer {key}"})
    response = conn.getresponse()
    assert response.status == 200, response.status
    closed = {}

    def drain():
        while response.read1(4096):
            pass
        closed["at"] = time.perf_counter()

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    return thread, closed


refused, stream_closed = [], []
for _ in range(ROUNDS):
    status, body = call(A, "POST", "/v1/keys", ADMIN, {"name": "bench"})
    assert status == 201, body
    created = json.loads(body)
    key, key_id = created["key"], created["id"]
    assert call(B, "GET", "/v1/jobs?limit=1", key)[0] == 200  # cached on B
    thread, closed = open_stream(B, key)
    sent = time.perf_counter()
    assert call(A, "DELETE", f"/v1/keys/{key_id}", ADMIN)[0] == 204
    while call(B, "GET", "/v1/jobs?limit=1", key)[0] != 401:
        pass
    refused.append(time.perf_counter() - sent)
    thread.join(10)
    stream_closed.append(closed.get("at", float("inf")) - sent)


def row(name, values):
    ms = sorted(v * 1000 for v in values)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {p99:.1f} | {ms[-1]:.1f} |")


print("| revoke on A, then on B | rounds | p50 ms | p99 ms | max ms |")
print("|---|---:|---:|---:|---:|")
row("B answers 401", refused)
row("B's open /v1/events stream closes", stream_closed)
