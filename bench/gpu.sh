#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one modern GPU: the CUDA tests, then the ViT-B/32 and
# 1.1B Llama folds on CUDA against the CPU engine and the naive fold in the same run, then the 8B
# fold when the disk holds its inputs (3 x 16 GB + the output), else a representative slice of
# its layers (same shapes, 4 of 32 decoder layers + the vocabulary tensors) whose time is scaled.
# Writes bench/results/gpu/*.json (or $OUT/*.json when OUT is set, as on a lent device machine).
# On a machine without CUDA it prints "no GPU" and exits 0.
#
#   bash bench/gpu.sh              # everything, ~8 min budget
#   QUICK=1 bash bench/gpu.sh      # the CUDA tests and the tiny shapes only (~1 min)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${OUT:-bench/results/gpu}
mkdir -p "$RESULTS"
deadline=$(( $(date +%s) + ${GPU_BUDGET_SECONDS:-460} ))
left() { echo $(( deadline - $(date +%s) )); }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "no GPU: torch.cuda.is_available() is False here (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'not importable')); nothing to run"
  exit 0
fi
"$PY" - <<'EOF' | tee "$RESULTS/device.json"
import json, torch
p = torch.cuda.get_device_properties(0)
print(json.dumps({"device": p.name, "memory_gb": round(p.total_memory / 1e9, 1), "torch": torch.__version__,
                  "cuda": torch.version.cuda, "count": torch.cuda.device_count()}))
EOF

status=0
echo "== CUDA tests (pytest -m gpu)"
timeout $(( $(left) < 120 ? $(left) : 120 )) "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
  --junitxml="$RESULTS/gpu-tests.xml" 2>&1 | tail -15 || status=1

if [ "${QUICK:-0}" = 1 ]; then
  echo "== quick folds (tiny shapes) on CUDA and CPU"
  timeout "$(left)" "$PY" bench/fold.py --quick --device cuda --no-floor --out "$RESULTS/fold-quick-cuda.json" || status=1
  exit $status
fi

echo "== ViT-B/32 and 1.1B Llama on CUDA (engine, io floor, decomposition, naive), $(left) s left"
timeout $(( $(left) * 2 / 5 )) "$PY" bench/fold.py --device cuda --model vit-b32 --model llama-1b --repeats 3 \
  --large-repeats 2 --naive-models vit-b32,llama-1b --fusionbench-models vit-b32 \
  --out "$RESULTS/fold-cuda.json" || status=1
echo "== the same on CPU for the ratio (ViT-B/32 only: the 1.1B CPU fold takes minutes), $(left) s left"
timeout $(( $(left) / 4 )) "$PY" bench/fold.py --device cpu --model vit-b32 --repeats 1 --no-naive --no-floor \
  --out "$RESULTS/fold-cpu.json" || status=1

echo "== Llama 8B, $(left) s left"
free_gb=$(df -Pk bench | awk 'NR==2 {print int($4 / 1024 / 1024)}')
if [ "$free_gb" -ge 75 ]; then
  model=llama-8b
else
  model=llama-8b-slice   # 4 of 32 layers + embeddings + lm_head; the JSON says how to scale it
  echo "   ${free_gb} GB free: the 8B inputs need ~64 GB + the output; folding a slice and scaling"
fi
timeout "$(left)" "$PY" bench/fold.py --device cuda --model "$model" --repeats 1 --no-naive --no-floor \
  --out "$RESULTS/fold-8b-cuda.json" || status=1
rm -rf bench/.cache/llama-8b*-cuda
echo "results in $RESULTS (exit $status)"
exit $status
