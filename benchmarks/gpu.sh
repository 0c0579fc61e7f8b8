#!/usr/bin/env bash
# One-shot GPU benchmark of vlprune: contract checks on CUDA in bf16 with SDPA, then 7B-shaped LLaVA-1.5 and
# LLaVA-NeXT (random weights drawn on the GPU) with every method at the papers' budgets, batch 1 and 8.
#
#   benchmarks/gpu.sh OUT_DIR                        # one H100/H200, stock PyTorch image: at most 8 minutes
#   benchmarks/gpu.sh OUT_DIR --tiny --device cpu    # the same code path on tiny shapes, on a CPU (under a minute)
#
# Writes OUT_DIR/gpu_bench.json, gpu_bench.md and gpu_bench.log (rewritten after every section). Further options
# go to benchmarks/gpu_bench.py (--attn flash_attention_2, --sections, --time-budget, ...; see its --help).
# Needs torch and transformers (5.x) with safetensors, tokenizers, numpy and pillow; vlprune is used from this
# checkout (PYTHONPATH), not installed. Anything missing is installed offline from the wheels in
# $VLPRUNE_WHEELS (default: benchmarks/wheels), if that folder exists.
set -euo pipefail

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: benchmarks/gpu.sh OUT_DIR [--tiny] [--device cpu|cuda] [gpu_bench.py options]" >&2
    exit 2
fi
OUT=$1
shift
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
WHEELS=${VLPRUNE_WHEELS:-$REPO/benchmarks/wheels}

missing=$("$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "safetensors": "safetensors", "tokenizers": "tokenizers",
        "numpy": "numpy", "PIL": "pillow"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    if [ -d "$WHEELS" ]; then
        echo "[gpu.sh] installing from $WHEELS (offline): $missing"
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" $missing
    else
        echo "[gpu.sh] missing Python packages: $missing; put their wheels in $WHEELS (or set VLPRUNE_WHEELS)" >&2
        exit 3
    fi
fi

cd "$REPO"
# a hard stop at 8 minutes; gpu_bench.py plans for 7 (--time-budget 420) and writes its results after every section
status=0
timeout --signal=TERM --kill-after=15 480 "$PY" benchmarks/gpu_bench.py "$OUT" "$@" || status=$?
if [ "$status" -eq 124 ]; then
    echo "[gpu.sh] stopped after 8 minutes; $OUT holds the sections that finished" >&2
fi
exit "$status"
