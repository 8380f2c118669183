#!/usr/bin/env bash
# The GPU figures in docs/performance.md and docs/scale.md: correctness checks, then benchmarks,
# all logged to one file. On a machine with an NVIDIA GPU and rmjax installed:
#
#   bash scripts/bench_gpu.sh [LOG]        # LOG defaults to runs/gpu.log
#   STEPS="7 5 3" bash scripts/bench_gpu.sh  # some steps, in that order
#
# Steps, most important first; each is cut off after STEP_TIMEOUT seconds (default 240):
#   1. cuDNN flash attention == XLA attention (loss, gradients; scripts/check_gpu.py)
#   2. SmolLM2-135M shape (30 layers), bf16, flash attention: rmjax (BT, + paper, + InfoNCE) vs
#      PyTorch, MFU, and a profile of one step
#   3. the same shape, BT only: flash attention against XLA's attention and against
#      model.scan_layers (step time, compile time), in the same rounds
#   4. Llama-3.2-1B shape (16 layers, d 2048, 32/8 heads, vocab 128256), bf16, flash attention
#   5. plan_memory's estimate vs XLA:GPU's memory analysis (remat none / dots_saveable / full;
#      three shapes, the third held out from the estimate's revisions), one device
#   6. the same on FSDP (1, 8, 1) and data x FSDP x tensor (2, 2, 2) meshes, compiled for 8 GPUs
#      that XLA mocks (check_gpu.py --mock_processes=8; compile only; slow on an H200, see
#      docs/scale.md: give it STEP_TIMEOUT)
#   7. train.create_state's random init of the 30-layer model (one jitted init per block shape)
set -u
LOG=${1:-runs/gpu.log}
mkdir -p "$(dirname "$LOG")"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
run() {
  echo "### $(echo "$*" | head -1)" | tee -a "$LOG"
  timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | grep -v -E "^[WI][0-9]{4} |TF_CPP|absl::InitializeLog" \
    | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$LOG"
B135="--layers=30 --pairs=8 --seq=1024 --dtype=bfloat16"
L1B="--layers=16 --dim=2048 --heads=32 --kv_heads=8 --head_dim=64 --mlp=8192 --vocab=128256"
L1B="$L1B --rope_theta=500000 --pairs=4 --seq=1024 --dtype=bfloat16"
step() {
  case $1 in
    1) run "$PY" scripts/check_gpu.py --parts=attention ;;
    2) run "$PY" scripts/bench_train.py $B135 --attention=cudnn --steps=10 --profile ;;
    3) run "$PY" scripts/bench_train.py $B135 --attention=cudnn --losses=bt --no_torch --steps=5 \
         --vs=attention=xla,scan_layers=true ;;
    4) run "$PY" scripts/bench_train.py $L1B --attention=cudnn --losses=bt,paper --steps=5 ;;
    5) run "$PY" scripts/check_gpu.py --parts=memory ;;
    6) for mesh in 2,2,2 1,8,1; do
         run "$PY" scripts/check_gpu.py --parts=memory --mesh=$mesh --mock_processes=8 \
           --shapes=${MESH_SHAPES:-0,1,2}
       done ;;
    7) run "$PY" -c "
import time, jax
from configs import synthetic
from rmjax import sharding, train
c = synthetic.get_config('paper')
c.model.update(vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
               head_dim=64, mlp_dim=1536)
with sharding.use_mesh(sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
  t0 = time.perf_counter()
  jax.block_until_ready(train.create_state(c)[1])
print(f'create_state, random init, 30 layers: {time.perf_counter() - t0:.1f} s')" ;;
    *) echo "no step $1" >&2; exit 2 ;;
  esac
}
for s in ${STEPS:-1 2 3 4 5 6 7}; do step "$s"; done
echo "### summary" | tee -a "$LOG"
grep -E "^README row|PASS|FAIL|within 15%|OFF$|compiled .* rmjax steps|compiled in|create_state" "$LOG"
