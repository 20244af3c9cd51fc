#!/usr/bin/env bash
# The GPU checks, as one call of a lent GPU machine (no network; torch, numpy, pytest preinstalled):
#   cp ../shared/mnist/*.gz .mnist/   # here, once; .mnist is git-ignored and carried
#   device run: bash benchmarks/device_check.sh [cuda|bench|suite]   (carry: .mnist)
# With no argument, everything, most telling first, inside one call's 600 s: the CUDA tests (the
# captured step against eager, a conditional model's labels included, resume, evaluation), the GPU benchmark (benchmarks.perf.gpu), where
# a default run's wall time goes (benchmarks.perf.startup), torchrun on the card, the conditional
# VAE and the VQ-VAE (`families`), the top-down hierarchy (`topdown`), burda2 with IWAE
# k=50 and DReG for 121 epochs, then the rest of the suite in the time left. An argument runs that part alone. Results go to $OUT.
set -uo pipefail
export PYTHONPATH=. VAELAB_DATA_DIR="${VAELAB_DATA_DIR:-$PWD/.mnist}" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/vaelab-device}"
mkdir -p "$OUT"
part="${1:-all}"
deadline=560  # seconds: the call's limit is 600, and $OUT still has to come back
want() { [ "$part" = all ] || [ "$part" = "$1" ]; }

{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } \
  | tee "$OUT/card.txt"

if want cuda; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider -rs --durations=10 tests/test_cuda.py 2>&1 \
    | tee "$OUT/pytest_cuda.log" | tail -15
fi

if want bench; then
  timeout 200 python3 -m benchmarks.perf.gpu --out "$OUT" --run-dir /tmp/gpu_run 2>&1 \
    | tee "$OUT/gpu.log" | tail -30
  # where a whole default run's wall time goes: imports, CUDA's first touch, data, build, epochs, figures
  timeout 60 python3 -m benchmarks.perf.startup --device cuda --out "$OUT" 2>&1 \
    | tee "$OUT/startup.log" | tail -14
fi

if [ "$part" = all ]; then
  # torchrun's path on the one lent card: a process group (NCCL for CUDA tensors) and DDP, world of one
  timeout 60 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m vaelab train --device cuda \
    --preset conv --likelihood logistic --optimizer adam --lr 1e-3 --epochs 2 --out /tmp/nccl_run --no-plots \
    2>&1 | tail -5 | tee "$OUT/nccl.log"
fi

if [ "$part" = all ] || [ "$part" = families ]; then
  # the model families on the card: a VQ-VAE (its step eager: a restart reads the host), its
  # prior over codes and both bounds; the same under torchrun's NCCL (the codebook's all-reduce);
  # a conditional VAE with the per-class prior, its samples of one class
  { timeout 120 python3 -m vaelab train --preset vq-vae --device cuda --epochs 2 --out /tmp/vq \
      --quiet --no-plots \
    && timeout 120 python3 -m vaelab train-prior /tmp/vq --epochs 2 --device cuda --quiet \
    && timeout 60 python3 -m vaelab evaluate /tmp/vq --device cuda; } 2>&1 | tee "$OUT/vq.log"
  timeout 60 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m vaelab train \
    --device cuda --preset vq-vae --epochs 1 --out /tmp/vq_nccl --no-plots 2>&1 | tail -3 \
    | tee -a "$OUT/vq.log"
  { timeout 90 python3 -m vaelab train --conditional --prior per-class --device cuda --epochs 2 \
      --out /tmp/cvae --quiet \
    && python3 -m vaelab sample /tmp/cvae --label 7 -o "$OUT/cvae_sevens.png"; } 2>&1 \
    | tee "$OUT/cvae.log"
fi

if [ "$part" = all ] || [ "$part" = topdown ]; then
  # the top-down hierarchy's MNIST preset on the card: its captured step (convolutions and the
  # average of the weights in the graph), a resume, the evaluation (K=100) with the KL per layer,
  # samples at a temperature; the epoch's seconds against the CPU's are in benchmarks/results/topdown.md
  { timeout 150 python3 -m vaelab train --preset topdown-mnist --device cuda --epochs 2 \
      --out /tmp/topdown --no-plots \
    && timeout 60 python3 -m vaelab train --resume /tmp/topdown --epochs 3 --no-plots \
    && timeout 120 python3 -m vaelab evaluate /tmp/topdown --device cuda \
    && python3 -m vaelab sample /tmp/topdown --temperature 0.8 -o "$OUT/topdown_samples.png"; } 2>&1 \
    | tee "$OUT/topdown.log" | tail -12
  cp /tmp/topdown/metrics.jsonl "$OUT/topdown_metrics.jsonl" 2>/dev/null
fi

if [ "$part" = all ] || [ "$part" = burda2 ]; then
  # burda2 with the IWAE bound, k=50 and DReG, for the first five stages of the burda schedule
  # (121 epochs), evaluated with K=5000: a few minutes on a card. `bash device_check.sh burda2` alone.
  left=$((deadline - SECONDS - 120))
  [ "$left" -ge 60 ] && timeout "$left" python3 -m vaelab train --preset burda2 --objective iwae --k 50 \
    --estimator dreg --optimizer adam --lr 1e-3 --schedule burda --batch-size 20 --epochs 121 --device cuda \
    --no-plots --quiet --out /tmp/burda2 2>&1 | tail -3 | tee "$OUT/burda2.log"
  [ -f /tmp/burda2/model.safetensors ] && timeout 120 python3 -m vaelab evaluate /tmp/burda2 --quiet 2>&1 \
    | tee -a "$OUT/burda2.log" && cp /tmp/burda2/metrics.jsonl /tmp/burda2/eval.json "$OUT/" 2>/dev/null
fi

if want suite; then
  # Each vaelab subprocess there pays ~4 s of imports and CUDA start-up, and the suite starts about a
  # hundred: spread the tests over the card machine's cores where pytest-xdist is installed, two
  # threads per worker (8 workers of torch's default 16 threads each would oversubscribe the cores).
  parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadfile")
  [ -n "$parallel" ] && export OMP_NUM_THREADS=2
  skip=$([ "$part" = all ] && echo "--ignore=tests/test_cuda.py")  # run above already
  left=$((deadline - SECONDS))
  [ "$part" = suite ] && left=$((left < 540 ? left : 540))
  echo "suite: ${left} s left" | tee "$OUT/pytest_all.log"
  [ "$left" -ge 30 ] && timeout "$left" python3 -m pytest -q -p no:cacheprovider $parallel $skip -rs --durations=15 2>&1 \
    | tee -a "$OUT/pytest_all.log" | tail -40
fi
