#!/usr/bin/env bash
# The GPU checks, as one call of a lent GPU machine (no network; torch, numpy, pytest preinstalled):
#   cp ../shared/mnist/*.gz .mnist/   # here, once; .mnist is git-ignored and carried
#   device run: bash benchmarks/device_check.sh   (carry: .mnist)
# Runs the CUDA tests, the GPU benchmark, torchrun on the card, then the whole suite; results go to $OUT.
set -uo pipefail
export PYTHONPATH=. VAELAB_DATA_DIR="${VAELAB_DATA_DIR:-$PWD/.mnist}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/vaelab-device}"
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee "$OUT/card.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log"
timeout 240 python3 benchmarks/gpu.py --out "$OUT" --run-dir /tmp/gpu_run 2>&1 | tee "$OUT/gpu.log"
# torchrun's path on the one lent card: a process group (NCCL for CUDA tensors) and DDP, world of one
timeout 90 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m vaelab train --device cuda \
  --epochs 3 --out /tmp/nccl_run --no-plots 2>&1 | tail -5 | tee "$OUT/nccl.log"
tar czf "$OUT/gpu_run.tgz" -C /tmp --exclude=figures gpu_run 2>/dev/null
timeout 200 python3 -m pytest -q -p no:cacheprovider --ignore=tests/test_cuda.py 2>&1 | tail -40 \
  > "$OUT/pytest_all.log"
tail -5 "$OUT/pytest_all.log"
