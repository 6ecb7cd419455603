"""Embeds the same sentences with sentence-transformers and with Conveyor's embedder (the
`embed` example of conveyor-jobs, release build); prints sentences/s, the ratio, and how close
the vectors are."""

import json, os, random, subprocess, sys, tempfile, time

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

MODEL, N = sys.argv[1], int(sys.argv[2])
TARGET = os.environ.get("CARGO_TARGET_DIR", "target")
EMBED = os.path.join(os.environ.get("BENCH_BIN") or os.path.join(TARGET, "release", "examples"),
                     "embed")

# Whole-word entries of the model's own vocabulary: realistic tokens, one per word mostly.
words = [w for w in open(os.path.join(MODEL, "vocab.txt")).read().split()
         if w.isalpha() and len(w) >= 3]
rng = random.Random(5)


def sentence(n_words):
    return " ".join(rng.choice(words) for _ in range(n_words)).capitalize() + "."


def mixed(n):
    # Half short (4-16 words), a third medium (16-60), the rest long (60-220: up to the
    # model's 256-token limit, where it truncates).
    out = []
    for _ in range(n):
        r = rng.random()
        lo, hi = (4, 16) if r < 0.5 else (16, 60) if r < 0.8 else (60, 220)
        out.append(sentence(rng.randint(lo, hi)))
    return out


workloads = [
    (f"{N:,} mixed-length sentences", mixed(N)),
    (f"{2 * N // 5:,} short sentences (4-16 words)", [sentence(rng.randint(4, 16)) for _ in range(2 * N // 5)]),
    (f"{N // 25:,} chunks of ~220 tokens", [sentence(200) for _ in range(N // 25)]),
]

st = SentenceTransformer(MODEL, device="cpu")
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
      f"sentence-transformers batch size 32 (its default)\n")
rows = []
for name, sentences in workloads:
    st.encode(sentences[:16])  # warm-up
    started = time.perf_counter()
    reference = st.encode(sentences, batch_size=32, normalize_embeddings=False)
    st_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "in.txt"), os.path.join(tmp, "out.f32")
        open(src, "w").write("\n".join(sentences) + "\n")
        report = json.loads(subprocess.run([EMBED, MODEL, src, out], check=True,
                                           capture_output=True, text=True).stdout)
        ours = np.fromfile(out, dtype="<f4").reshape(len(sentences), -1)
    cosine = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
    rows.append((name, len(sentences) / st_seconds, len(sentences) / report["seconds"], cosine.min()))

print(f"| workload | sentence-transformers /s | conveyor /s | ratio | min cosine |")
print(f"|---|---:|---:|---:|---:|")
for name, theirs, ours, cos in rows:
    print(f"| {name} | {theirs:,.1f} | {ours:,.1f} | {ours / theirs:.2f}x | {cos:.5f} |")
