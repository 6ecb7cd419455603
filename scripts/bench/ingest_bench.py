"""Submits one `ingest` job of generated documents (80-400 words of the model's own vocabulary,
inline text) to a running API, waits for it, and prints the job's own figures as a table: its
rate, where its time went, and the bare embedder (EMBED, the `embed` example) on the very chunk
texts the job stored (read back from DATABASE), in the same run."""

import json, os, random, subprocess, sys, tempfile, time, urllib.request

BASE, KEY, MODEL, N, DATABASE, EMBED = sys.argv[1:7]
N = int(N)


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
# The texts the job embedded, in its order, one per line (generated text has no newlines).
texts = subprocess.run(["psql", DATABASE, "-tAqc",
                        f"SELECT text FROM chunks WHERE collection_id = '{collection['id']}' "
                        "ORDER BY id"],
                       check=True, capture_output=True, text=True).stdout.splitlines()
assert len(texts) == result["chunks"], (len(texts), result["chunks"])
with tempfile.TemporaryDirectory() as tmp:
    src = os.path.join(tmp, "chunks.txt")
    open(src, "w").write("\n".join(texts) + "\n")
    bare = json.loads(subprocess.run([EMBED, MODEL, src, os.path.join(tmp, "out.f32")],
                                     check=True, capture_output=True, text=True).stdout)
bare_rate = bare["sentences"] / bare["seconds"]
seconds = result["elapsed_ms"] / 1000
print("| documents | chunks | job time s | chunks/s (job) | chunks/s (bare embedder) | job / bare | submit → succeeded s |")
print("|---:|---:|---:|---:|---:|---:|---:|")
print(f"| {result['documents']:,} | {result['chunks']:,} | {seconds:.1f} "
      f"| {result['chunks_per_second']:,.1f} | {bare_rate:,.1f} "
      f"| {result['chunks_per_second'] / bare_rate:.2f}x | {wall:.1f} |")
print()
print("| the job's time | seconds | share |")
print("|---|---:|---:|")
timings = result["timings"]
for phase in ("read", "chunk", "embed", "store"):
    spent = timings[f"{phase}_seconds"]
    print(f"| {phase} | {spent:.2f} | {spent / seconds:.0%} |")
rest = seconds - sum(timings.values())
print(f"| the rest (progress events, checks) | {rest:.2f} | {rest / seconds:.0%} |")
