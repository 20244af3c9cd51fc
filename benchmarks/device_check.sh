#!/usr/bin/env bash
# The GPU checks, as one call of a lent GPU machine (no network; torch, numpy, pytest preinstalled):
#   cp ../shared/mnist/*.gz .mnist/   # here, once; .mnist is git-ignored and carried
#   device run: bash benchmarks/device_check.sh   (carry: .mnist)
# torchrun on the card, where a default run's wall time goes (benchmarks/startup.py), then the whole suite (CUDA tests
# included); `bash benchmarks/device_check.sh bench` runs the GPU benchmark instead of the suite.
# Results go to $OUT.
set -uo pipefail
export PYTHONPATH=. VAELAB_DATA_DIR="${VAELAB_DATA_DIR:-$PWD/.mnist}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/vaelab-device}"
mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee "$OUT/card.txt"
# torchrun's path on the one lent card: a process group (NCCL for CUDA tensors) and DDP, world of one
timeout 90 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m vaelab train --device cuda \
  --preset conv --likelihood logistic --optimizer adam --lr 1e-3 --epochs 2 --out /tmp/nccl_run --no-plots \
  2>&1 | tail -5 | tee "$OUT/nccl.log"
# where a whole default run's wall time goes: imports, CUDA's first touch, data, build, epochs, figures
timeout 90 python3 benchmarks/startup.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/startup.log"
if [ "${1:-}" = bench ]; then
  timeout 240 python3 benchmarks/gpu.py --out "$OUT" --run-dir /tmp/gpu_run 2>&1 | tee "$OUT/gpu.log"
else
  # Each vaelab subprocess there pays ~4 s of imports and CUDA start-up, and the suite starts about a
  # hundred: spread the tests over the card machine's cores where pytest-xdist is installed.
  # Two threads per worker: 8 workers of torch's default 16 threads each would oversubscribe the cores.
  parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadfile")
  [ -n "$parallel" ] && export OMP_NUM_THREADS=2
  timeout 380 python3 -m pytest -q -p no:cacheprovider $parallel -rs --durations=15 2>&1 | tee "$OUT/pytest_all.log" \
    | tail -60
fi
