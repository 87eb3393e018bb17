#!/usr/bin/env bash
# Every GPU check in one run (under 8 minutes on one GPU): the CUDA tests (the compiled default step against
# the dense reference, bf16 parameters, the fp16 GradScaler's skipped steps, resume, no host sync inside a
# step), then step timings against torch's fused AdamW on ResNet-50 and BERT-base shapes, fp32 and bf16.
#
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.txt
#
# Runs from a checkout (no install needed: PYTHONPATH is the checkout); uses pytest when it is installed,
# else the test file's own runner.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
assert torch.cuda.is_available(), "no CUDA GPU: torch.cuda.is_available() is False"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}")
PY
echo "== CUDA tests"
if python -c "import pytest" 2>/dev/null; then
  python -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider
else
  python tests/test_cuda.py
fi
echo "== step time vs torch's fused AdamW (CAM-HD on CUDA: its compiled step; the first steps compile)"
for dtype in float32 bfloat16; do
  python scripts/bench_step.py --device cuda --dtype "$dtype" --models resnet50,bert-base --bases adamw \
    --trees global+layer,global+layer+parameter --steps 30 --warmup 5
done
