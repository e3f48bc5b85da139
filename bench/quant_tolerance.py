"""Measure the relative L2 error of every GGML type llama.cpp's own quantizer writes, on a
model of N(0, 0.02) weights (as transformers initializes them) and on a trained-like
heavy-tailed one, so that diff's per-type tolerances (diff/values.py) rest on numbers.

    python bench/quant_tolerance.py [--hidden 512] [--ffn 1408] [--layers 2]

Prints, per GGML type: the tensors llama.cpp stored in it and the largest and median rel L2
|dequantized - source| / |source| over them. No timing: this is a measurement of error.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FTYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M",
          "Q6_K", "IQ4_NL", "IQ4_XS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=2)
    a = ap.parse_args()
    from apr.config import ModelConfig
    from apr.convert import convert
    from apr.llamacpp import quantize
    from apr.model import open_model
    from apr.container import write_apr, TensorSource
    from apr.dtypes import dtype_by_name

    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = ModelConfig("llama", a.hidden, a.layers, a.hidden // 64, a.hidden // 128, a.ffn, 512,
                          max_position_embeddings=256, rms_norm_eps=1e-5)
        for dist in ("normal", "student-t"):
            rng = np.random.default_rng(0)
            tensors = {}
            for name, shape in cfg.tensor_shapes().items():
                if len(shape) == 1:
                    tensors[name] = np.ones(shape, np.float32)
                elif dist == "normal":
                    tensors[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
                else:     # heavy tails, as trained weights have
                    tensors[name] = (rng.standard_t(4, shape) * 0.02).astype(np.float32)
            src = tmp / f"{dist}.apr"
            meta = {"model_type": "llama", **cfg.to_apr_metadata()}
            write_apr(src, meta, [TensorSource(n, dtype_by_name("F32"), t.shape, (lambda t=t: t))
                                  for n, t in tensors.items()])
            f32 = tmp / f"{dist}.gguf"
            convert(src, f32, allow_no_tokenizer=True, force=True)
            for ftype in FTYPES:
                out = quantize(f32, tmp / f"{dist}-{ftype}.gguf", ftype)
                with open_model(out) as v:
                    for name, ref in v.tensors.items():
                        if len(ref.shape) < 2:
                            continue
                        x = tensors[name]
                        y = ref.numpy(np.float32, order="hf")
                        rel = float(np.linalg.norm(y - x) / np.linalg.norm(x))
                        results.setdefault(f"{ref.dtype.name} ({dist})", []).append(rel)
    rows = {k: {"tensors": len(v), "max_rel_l2": max(v), "median_rel_l2": float(np.median(v))}
            for k, v in sorted(results.items())}
    for k, r in rows.items():
        print(f"{k:24s} {r['tensors']:4d} tensors   max rel L2 {r['max_rel_l2']:.4f}   "
              f"median {r['median_rel_l2']:.4f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
