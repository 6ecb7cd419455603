"""all-MiniLM-L6-v2 in plain numpy (mean pooled, as sentence-transformers computes it), from
the same model files the platform loads: the search benchmark's base embeddings without
PyTorch. Checked against embed/fixtures/reference_embeddings.json by `python minilm_numpy.py
MODEL_DIR`."""

import json, math, os, sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # threads only fight over small matrices

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


class MiniLM:
    def __init__(self, model_dir, max_len=256):
        self.w = load_file(os.path.join(model_dir, "model.safetensors"))
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tok.enable_truncation(max_len)
        self.tok.no_padding()
        cfg = json.load(open(os.path.join(model_dir, "config.json")))
        self.layers, self.heads, self.eps = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["layer_norm_eps"]

    def _ln(self, x, name):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / np.sqrt(v + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"]

    def _lin(self, x, name):
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _one(self, ids):
        w, n = self.w, len(ids)
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        h = self.heads
        d = x.shape[1] // h
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q = self._lin(x, p + "attention.self.query").reshape(n, h, d).transpose(1, 0, 2)
            k = self._lin(x, p + "attention.self.key").reshape(n, h, d).transpose(1, 0, 2)
            v = self._lin(x, p + "attention.self.value").reshape(n, h, d).transpose(1, 0, 2)
            s = q @ k.transpose(0, 2, 1) / math.sqrt(d)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = (s @ v).transpose(1, 0, 2).reshape(n, h * d)
            x = self._ln(self._lin(a, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            t = self._lin(x, p + "intermediate.dense")
            t = 0.5 * t * (1 + _erf(t / math.sqrt(2)))
            x = self._ln(self._lin(t, p + "output.dense") + x, p + "output.LayerNorm")
        return x.mean(0)

    def encode(self, texts, normalize=True):
        out = np.stack([self._one(np.array(e.ids)) for e in self.tok.encode_batch(list(texts))]).astype(np.float32)
        if normalize:
            out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out


def _erf(x):
    # W. J. Cody's rational approximation as Numerical Recipes' erfc (|error| < 1.2e-7).
    z = np.abs(x)
    t = 1 / (1 + 0.5 * z)
    r = t * np.exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
    return np.where(x >= 0, 1 - r, r - 1)


if __name__ == "__main__":
    ref = json.load(open(os.path.join(os.path.dirname(__file__), "../../embed/fixtures/reference_embeddings.json")))
    model = MiniLM(sys.argv[1])
    got = model.encode([s["text"] for s in ref["sentences"]])  # the model ends in Normalize
    want = np.array([s["vector"] for s in ref["sentences"]])
    print("max abs difference from sentence-transformers:", float(np.abs(got - want).max()))
