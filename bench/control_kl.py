"""diff's control on quantized pairs: llama.cpp's quantization of a float model against the
control (the float weights rounded by our encoder of each stored type), and the same for a
source whose layer-1 attn_v was scaled by 1.1. Prints, per file type, the KL of each file
against the float model, the control's KL and their ratio, and whether diff's logits agree.

    python bench/control_kl.py [--types Q8_0,Q4_0,Q4_K_M,Q5_K_M,Q6_K]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,Q4_0,Q4_K_M,Q5_K_M,Q6_K")
    args = ap.parse_args(argv)
    from apr import llamacpp
    from apr.convert import convert
    from diff import compare
    from oracles import make_hf_model, scaled_copy

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        a = make_hf_model(t / "a", "llama", hidden=256, ffn=512, seed=5)
        b = scaled_copy(a, t / "b", "model.layers.1.self_attn.v_proj.weight", 1.1)
        convert(a, t / "a.gguf")
        convert(b, t / "b.gguf")
        print("| type | source | KL | control KL | ratio | top-1 | logits |")
        print("|---|---|---|---|---|---|---|")
        for q in args.types.split(","):
            for label, src in (("clean", "a"), ("attn_v x 1.1", "b")):
                out = llamacpp.quantize(t / f"{src}.gguf", t / f"{src}-{q}.gguf", q)
                lg = compare(a, out).logits
                ctl = f"{lg.control_kl:.3g}" if lg.control else "(no encoder: table)"
                ratio = f"{lg.kl_mean / lg.control_kl:.2f}" if lg.control else "-"
                print(f"| {q} | {label} | {lg.kl_mean:.3g} | {ctl} | {ratio} | "
                      f"{lg.top1_agreement:.0%} | {'agree' if lg.agree else 'diverge'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
