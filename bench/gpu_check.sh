#!/usr/bin/env bash
python -c "import cupy, torch" || { echo "error: the GPU check needs cupy and torch importable" >&2; exit 2; }
# The whole GPU check in one run (under 8 minutes; each step has its own time limit and the
# limits add up to 465 s). Results go under $OUT:
#   summary.txt          one line per step: exit status, seconds, the key numbers
#   env.txt              GPU, driver, versions, missing project dependencies
#   gpu_tests.log/.xml/.json   tests/gpu (kernels, model vs NumPy, bf16, 20 training steps)
#   train_gpu_bf16.json, train_gpu_f32.json (+ .log)   bench/train_gpu.py, Qwen2-0.5B, 4 x 1024
#   ref_run/             the ~50M reference run: metrics.jsonl, loss.png, run.json, summary.json
#                        (pretrain --json), qa.json (qa --json on best.apr); ref_*.log
# Usage: OUT=/some/dir bash bench/gpu_check.sh     (run from anywhere; nothing is downloaded)
# APR_REF_WHEELS=DIR: install missing project dependencies from wheels in DIR (no index).
set -uo pipefail
: "${OUT:?set OUT to the directory for the results}"
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
mkdir -p "$OUT/ref_run"
WORK=$(mktemp -d)
START=$(date +%s)
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_SECONDS COMMAND...: stdout+stderr to $OUT/NAME.log, status to summary.txt
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    note "$name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s; $(( $(date +%s) - START )) s total)$([ $rc = 124 ] && echo ' TIMED OUT')"
    return $rc
}

# 1. environment and dependencies ------------------------------------------------------
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
    python - <<'EOF'
import importlib, platform
print("python", platform.python_version())
missing = []
for mod in ("cupy", "torch", "numpy", "safetensors", "tokenizers", "gguf", "click", "tqdm",
            "ml_dtypes", "matplotlib", "scipy", "jinja2", "transformers", "pytest"):
    try:
        m = importlib.import_module(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as e:
        missing.append(mod)
        print(mod, "MISSING:", type(e).__name__, e)
print("missing:", " ".join(missing) or "none")
EOF
} > "$OUT/env.txt" 2>&1
MISSING=$(sed -n 's/^missing: //p' "$OUT/env.txt")
note "env: $(head -2 "$OUT/env.txt" | tail -1); missing dependencies: ${MISSING:-?}"
if [ -n "${APR_REF_WHEELS:-}" ] && [ "$MISSING" != "none" ]; then
    step install 60 python -m pip install --no-index --find-links "$APR_REF_WHEELS" $MISSING
fi

# 2. tests/gpu --------------------------------------------------------------------------
APR_REF_GPU_TESTS=1 APR_REF_GPU_REPORT="$OUT/gpu_tests.json" \
    step gpu_tests 120 python -m pytest -q -p no:cacheprovider tests/gpu \
    --junitxml="$OUT/gpu_tests.xml" --basetemp="$WORK/pytest"
note "  $(tail -1 "$OUT/gpu_tests.log")"

# 3. training throughput against PyTorch -------------------------------------------------
step train_gpu_bf16 75 python bench/train_gpu.py --preset qwen2-0.5b --seq 1024 --batch 4 \
    --steps 5 --warmup 2 --dtype bf16 --device cuda --out "$OUT/train_gpu_bf16.json"
step train_gpu_f32 55 python bench/train_gpu.py --preset qwen2-0.5b --seq 1024 --batch 4 \
    --steps 3 --warmup 1 --dtype f32 --device cuda --out "$OUT/train_gpu_f32.json"
for d in bf16 f32; do
    [ -f "$OUT/train_gpu_$d.log" ] && note "$(sed 's/^/  /' "$OUT/train_gpu_$d.log" | tail -5)"
done

# 4. reference run: ~50M parameters on the standard library's source, bf16 -------------------
SHAPE=(--hidden-size 576 --num-layers 12 --num-heads 9 --num-kv-heads 3 --intermediate-size 1536
       --vocab-size 8192)
step ref_prepare 20 python - "$WORK" <<'EOF'
import sys
from pathlib import Path
from ref.demo import stdlib_corpus, train_tokenizer
work = Path(sys.argv[1])
files, size = stdlib_corpus(work / "corpus")
train_tokenizer(work / "corpus", work / "tokenizer", vocab_size=8192)
print(f"corpus: {files} files, {size / 1e6:.1f} MB; byte-level BPE, 8192 tokens")
EOF
# steps that fit in about 90 s at the measured speed of this shape (3 timed steps)
step ref_calibrate 25 python - "$WORK" "${SHAPE[@]}" <<'EOF'
import json, subprocess, sys
from pathlib import Path
r = subprocess.run([sys.executable, "bench/train_gpu.py", "--preset", "qwen2-25m", *sys.argv[2:],
                    "--batch", "16", "--seq", "512", "--steps", "3", "--warmup", "1", "--dtype",
                    "bf16", "--device", "cuda", "--no-torch", "--peak-n", "2048", "--json"],
                   capture_output=True, text=True, check=True)
tps = json.loads(r.stdout)["ours"]["tokens_per_second"]
steps = max(50, min(1500, int(90 * tps / (16 * 512))))
print(f"measured {tps:.0f} tokens/s -> {steps} steps")
Path(sys.argv[1], "steps").write_text(str(steps))
EOF
STEPS=$(cat "$WORK/steps" 2>/dev/null || echo 300)          # 300 when the measurement failed
note "  $(cat "$OUT/ref_prepare.log" "$OUT/ref_calibrate.log" | tail -2 | tr '\n' ' ')"
step ref_pretrain 130 bash -c 'python cli.py pretrain "$@" > "$0"' "$OUT/ref_run/summary.json" \
    --dataset "$WORK/corpus" --tokenizer "$WORK/tokenizer" --arch qwen2-25m "${SHAPE[@]}" \
    --run-dir "$WORK/run" --steps "$STEPS" --batch-size 16 --seq-length 512 --lr 1e-3 \
    --eval-every $(( STEPS / 10 > 0 ? STEPS / 10 : 1 )) --val-batches 10 --save-every "$STEPS" \
    --device cuda --dtype bf16 --allow-data-starvation -q --json
for f in metrics.jsonl loss.png run.json; do cp "$WORK/run/$f" "$OUT/ref_run/" 2>/dev/null; done
if [ ! -f "$OUT/ref_run/loss.png" ] && [ -f "$WORK/run/metrics.jsonl" ]; then      # cut short
    python -c "import sys; from pathlib import Path; from ref.train import plot_metrics; plot_metrics(Path(sys.argv[1]), Path(sys.argv[2]))" \
        "$WORK/run/metrics.jsonl" "$OUT/ref_run/loss.png"
fi
python - "$OUT/ref_run/metrics.jsonl" <<'EOF' | tee -a "$SUMMARY"
import json, sys
try:
    rec = [json.loads(l) for l in open(sys.argv[1])]
except OSError:
    sys.exit(print("  ref_run: no metrics"))
val = [(r["step"], r["val_loss"]) for r in rec if r.get("val_loss") is not None]
print(f"  ref_run: {rec[-1]['step']} steps; validation loss {val[0][1]:.3f} at step {val[0][0]} -> "
      f"{val[-1][1]:.3f} at step {val[-1][0]}")
EOF
step ref_qa 40 bash -c 'python cli.py qa "$1" --json > "$0"' "$OUT/ref_run/qa.json" \
    "$WORK/run/ckpt/best.apr"
note "  qa: $(python -c "import json,sys; r=json.load(open(sys.argv[1])); print('PASSED' if r['passed'] else 'FAILED', ', '.join(g['name'] + ('' if g['passed'] else ' FAIL') + (' skipped' if g.get('skipped') else '') for g in r['gates']))" "$OUT/ref_run/qa.json" 2>&1 | tail -1)"

note "total: $(( $(date +%s) - START )) s"
rm -rf "$WORK"
