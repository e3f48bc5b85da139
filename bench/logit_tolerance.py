"""Measure the logit divergence that storage rounding alone causes, per storage type: the KL
divergence (mean over positions of KL(softmax A || softmax B), as llama.cpp's `perplexity
--kl-divergence` reports it) and the top-1 agreement between a float model and its
quantization by llama.cpp's own quantizer (llama_model_quantize), or by this project's
writers for the types llama.cpp does not write (APR_Q8, APR_Q4, and the K-quants of
matrices whose rows are not multiples of 256). The logits are diff's own (`diff.compare`),
on its default token ids, on the test models of tests/ (random HF Llama and Qwen2, the
quantizer test's Llama of width 256) and a small Qwen2 trained by the reference trainer.

    python bench/logit_tolerance.py        # prints a table; diff/logits.py LOGIT_TOLERANCE

Each row is keyed by the lossiest storage type of the quantized file (a Q4_K_M file holds
Q4_K and Q6_K: its row is Q4_K), as diff keys its tolerance.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

FTYPES = ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
          "Q4_0", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q2_K")
APR_DTYPES = ("q8_0", "f16", "bf16")


def models(tmp: Path) -> dict[str, Path]:
    """name -> F32 GGUF."""
    from apr.convert import convert
    from oracles import make_hf_model
    out = {}
    specs = {"llama-64": dict(family="llama", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, seed=1),
             "qwen2-64": dict(family="qwen2", hidden=64, layers=2, heads=4, kv_heads=2, ffn=96,
                              tied=True, rope_theta=1e6, seed=2),
             "llama-256": dict(family="llama", hidden=256, layers=2, heads=4, kv_heads=2, ffn=512, seed=5)}
    for name, spec in specs.items():
        hf = make_hf_model(tmp / name, **spec)
        convert(hf, tmp / f"{name}.gguf")
        out[name] = tmp / f"{name}.gguf"
    out["qwen2-trained"] = trained(tmp)
    return out


def trained(tmp: Path) -> Path:
    from apr.convert import convert
    from oracles import write_stdlib_corpus, write_tokenizer
    from ref.train import RunConfig, start_run, train
    corpus = write_stdlib_corpus(tmp / "corpus")
    write_tokenizer(tmp)
    cfg = RunConfig(dataset=str(corpus), run_dir=str(tmp / "run"), tokenizer=str(tmp / "tokenizer.json"),
                    arch="qwen2-tiny", shape=dict(vocab_size=448, hidden_size=256, intermediate_size=512),
                    steps=300, batch_size=8, seq_length=64, lr=3e-3, eval_every=300, save_every=300,
                    val_batches=4, val_fraction=0.3, device="cpu", allow_data_starvation=True)
    s = train(start_run(cfg, progress=False, log=lambda s: None), progress=False, log=lambda s: None)
    convert(s.checkpoints["final"], tmp / "trained.gguf")
    return tmp / "trained.gguf"


def main() -> None:
    from apr import llamacpp
    from apr.convert import convert
    from apr.errors import AprError
    from diff import compare
    from diff.logits import side_storage
    from apr.model import open_model
    rows: dict[str, list[tuple[str, str, float, float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, src in models(tmp).items():
            outs = []
            for ft in FTYPES:
                try:
                    outs.append((ft, llamacpp.quantize(src, tmp / f"{name}-{ft}.gguf", ft)))
                except AprError as e:
                    print(f"{name} {ft}: {e}", file=sys.stderr)
            for dt in APR_DTYPES:
                convert(src, tmp / f"{name}-{dt}.apr", dtype=dt)
                outs.append((f"apr {dt}", tmp / f"{name}-{dt}.apr"))
            for label, q in outs:
                with open_model(q) as v:
                    storage = side_storage(v)
                r = compare(src, q)
                lg = r.logits
                rows.setdefault(storage, []).append((name, label, lg.kl_mean, lg.top1_agreement))
                print(f"{name:14} {label:10} {storage:7} KL {lg.kl_mean:.3e}  top-1 {lg.top1_agreement:.0%}",
                      flush=True)
    print("\nstorage  worst KL    worst top-1   (of)")
    for storage, rs in sorted(rows.items()):
        print(f"{storage:8} {max(r[2] for r in rs):.3e}   {min(r[3] for r in rs):.0%}   "
              + ", ".join(f"{n}/{lab}" for n, lab, _, _ in rs))


if __name__ == "__main__":
    main()
