"""Submits one `ingest` job of generated documents (80-400 words of the model's own vocabulary,
inline text) to a running API, waits for it, and prints the job's own figures as a table."""

import json, os, random, sys, time, urllib.request

BASE, KEY, MODEL, N = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def call(method, path, body=None):
    request = urllib.request.Request(
        BASE + path, method=method, data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


words = [w for w in open(os.path.join(MODEL, "vocab.txt")).read().split()
         if w.isalpha() and len(w) >= 3]
rng = random.Random(7)


def document(i):
    sentences = []
    for _ in range(rng.randint(80, 400) // 10):
        sentences.append(" ".join(rng.choice(words) for _ in range(10)).capitalize() + ".")
    return {"id": f"doc-{i}", "text": " ".join(sentences), "metadata": {"n": i}}


collection = call("POST", "/v1/collections",
                  {"name": "bench", "chunking": {"max_tokens": 200, "overlap": 32}})
documents = [document(i) for i in range(N)]
started = time.perf_counter()
job = call("POST", "/v1/jobs", {"kind": "ingest", "payload": {
    "collection_id": collection["id"], "documents": documents}})
while True:
    job = call("GET", f"/v1/jobs/{job['id']}")
    if job["status"] in ("succeeded", "failed", "cancelled"):
        break
    time.sleep(0.2)
wall = time.perf_counter() - started
if job["status"] != "succeeded":
    sys.exit(f"ingest job {job['status']}: {job.get('error')}")
result = job["result"]
print("| documents | chunks | job time s | chunks/s (job) | submit → succeeded s |")
print("|---:|---:|---:|---:|---:|")
print(f"| {result['documents']:,} | {result['chunks']:,} | {result['elapsed_ms'] / 1000:.1f} "
      f"| {result['chunks_per_second']:,.0f} | {wall:.1f} |")
