#!/usr/bin/env bash
# Every GPU check the project has, in one unattended run: well under 8 minutes on an H100/H200.
#   1. zero-kernels' tests with the Triton path on CUDA, against their references and float64
#   2. a training run on CUDA (the demo GPT over NCCL, one rank) whose loss must halve
#   3. ZeRO stage 3 on CUDA: parity with torch AdamW, and a bf16 run built partitioned
#   4. zero-ckpt on CUDA: checkpointing bitwise equal with the CUDA RNG, device bytes held, async save
#   5. zero-offload on CUDA: stage 2 with the optimizer in pinned host memory (parity), stage 3 with
#      everything on NVMe (bf16, loss must fall), device peak against the model's states
#   6. inference's parts on CUDA: KV-cache decoding equal to the eager loop, int8 weights through the
#      Triton dequantisation, layers streamed from pinned host memory (benchmarks/gpu_inference_check.py)
#   7. the kernel benchmark table (benchmarks/kernels.py)
# Runs from the source tree (PYTHONPATH), as on the lent GPU machine, which has torch, triton
# and pytest installed and no network. Results go to $OUT (default benchmarks/results).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/packages/zero-comm/src:$PWD/kernels/src:$PWD/packages/zero-optim/src:$PWD/packages/zero-ckpt/src:$PWD/packages/zero-offload/src:$PWD/packages/zero-pipe/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
failed=()
step() {
    local name=$1 limit=$2; shift 2
    echo; echo "== $name"
    local start=$SECONDS
    if timeout "$limit" "$@"; then echo "-- ok: $name ($((SECONDS - start))s)"
    else echo "!! FAILED: $name ($((SECONDS - start))s)"; failed+=("$name"); fi
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())"

step "kernels: Triton on CUDA vs references" 240 python3 -m pytest -q -p no:cacheprovider kernels/tests
step "training on CUDA: demo GPT, NCCL" 120 torchrun --standalone --nproc-per-node 1 examples/train_gpt.py --deepspeed_config examples/ds_config.json --steps 200 --out /tmp/gpu-demo
step "ZeRO stage 3 on CUDA" 120 torchrun --standalone --nproc-per-node 1 benchmarks/gpu_stage3_check.py
step "zero-ckpt on CUDA" 120 torchrun --standalone --nproc-per-node 1 benchmarks/gpu_ckpt_check.py
step "zero-offload on CUDA" 120 torchrun --standalone --nproc-per-node 1 benchmarks/gpu_offload_check.py
step "inference parts on CUDA" 90 python3 benchmarks/gpu_inference_check.py
step "kernel benchmark table" 180 python3 benchmarks/kernels.py --out "$OUT"

echo
if [ ${#failed[@]} -eq 0 ]; then echo "gpu_check: all passed"; else echo "gpu_check: FAILED: ${failed[*]}"; exit 1; fi
