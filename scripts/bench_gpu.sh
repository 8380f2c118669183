#!/usr/bin/env bash
# The GPU figures in README (Performance; Memory planning): correctness checks, then benchmarks,
# all logged to one file. On a machine with an NVIDIA GPU and rmjax installed:
#
#   bash scripts/bench_gpu.sh [LOG]        # LOG defaults to runs/gpu.log
#
# On an H200 (2026-11-26), run one by one: steps 2 and 4 as README's rows (fewer losses) took
# 168 s together, step 5 53 s, step 1 passed; steps 3 and 6 have not run there yet.
#
# Steps, most important first; each is cut off after STEP_TIMEOUT seconds (default 240):
#   1. cuDNN flash attention == XLA attention (loss, gradients; scripts/check_gpu.py)
#   2. SmolLM2-135M shape (30 layers), bf16, flash attention: rmjax (BT, + paper, + InfoNCE) vs
#      PyTorch, MFU, and a profile of one step
#   3. the same with XLA's attention (BT only)
#   4. Llama-3.2-1B shape (16 layers, d 2048, 32/8 heads, vocab 128256), bf16, flash attention
#   5. plan_memory's estimate vs XLA:GPU's memory analysis (remat none / dots_saveable / full;
#      two shapes, the second held out from the estimate's revision)
#   6. compile time with model.scan_layers (against step 2's compile times)
#   7. train.create_state's random init of the 30-layer model (one jitted init per block shape)
set -u
LOG=${1:-runs/gpu.log}
mkdir -p "$(dirname "$LOG")"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
run() {
  echo "### $*" | tee -a "$LOG"
  timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | grep -v -E "^[WI][0-9]{4} |TF_CPP|absl::InitializeLog" \
    | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOG"
B135="--layers=30 --pairs=8 --seq=1024 --dtype=bfloat16"
L1B="--layers=16 --dim=2048 --heads=32 --kv_heads=8 --head_dim=64 --mlp=8192 --vocab=128256"
L1B="$L1B --rope_theta=500000 --pairs=4 --seq=1024 --dtype=bfloat16"
run "$PY" scripts/check_gpu.py --parts=attention
run "$PY" scripts/bench_train.py $B135 --attention=cudnn --steps=10 --profile
run "$PY" scripts/bench_train.py $B135 --attention=xla --losses=bt --steps=10
run "$PY" scripts/bench_train.py $L1B --attention=cudnn --losses=bt,paper --steps=5
run "$PY" scripts/check_gpu.py --parts=memory
run "$PY" scripts/bench_train.py $B135 --attention=cudnn --losses=bt --no_torch --steps=3 \
  --scan_layers
run "$PY" -c "
import time, jax
from configs import synthetic
from rmjax import sharding, train
c = synthetic.get_config('paper')
c.model.update(vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
               head_dim=64, mlp_dim=1536)
with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
  t0 = time.perf_counter()
  jax.block_until_ready(train.create_state(c)[1])
print(f'create_state, random init, 30 layers: {time.perf_counter() - t0:.1f} s')"
echo "### summary" | tee -a "$LOG"
grep -E "^README row|PASS|FAIL|within 15%|OFF$|compiled .* rmjax steps|create_state" "$LOG"
