#!/usr/bin/env bash
# The proxy v2 recipe in one call on one GPU (bf16 autocast where the device computes it natively):
#   bash evals/proxy/gpu_run.sh OUT            # writes OUT/tower.pt, OUT/llava-proxy, OUT/llava-next-proxy
# The default scale is sized to fit 9 minutes of one H200 (not yet run on one). TINY=1 runs every stage for a few steps (a check on a CPU:
#   TINY=1 DEVICE=cpu bash evals/proxy/gpu_run.sh /tmp/v2-tiny).
set -euo pipefail
OUT=${1:?usage: bash evals/proxy/gpu_run.sh OUT}
DEVICE=${DEVICE:-cuda}
if [ "${TINY:-0}" = 1 ]; then
    T=(--steps 4 --teacher-steps 2 --batch-size 8)
    D=(--cache 32 --stages 64:4:4,144:2:2,576:2:2 --val-n 12 --eval-every 2)
    N=(--steps 2 --batch-size 1 --val-n 4)
else
    T=(--steps 6000 --teacher-steps 600 --batch-size 192)
    D=(--cache 30000 --stages 64:6000:32,144:800:16,576:800:8 --val-n 600 --eval-every 500)
    N=(--steps 800 --batch-size 4 --val-n 240)
fi
python -m evals.proxy.recipe tower --out "$OUT" --device "$DEVICE" "${T[@]}"
python -m evals.proxy.recipe decoder --out "$OUT" --device "$DEVICE" "${D[@]}"
python -m evals.proxy.recipe next --out "$OUT" --device "$DEVICE" "${N[@]}"
