#!/usr/bin/env bash
# vipo's WGSL kernels on a GPU against PyTorch CUDA on the same card, fp32 with TF32 off, in one
# run, most important first:
#   0. build (where cargo is and VIPO is not given) and the GPU tests on this card (CI=true, so
#      a missing adapter fails): `cargo test --release` of the GPU test files, or, on a machine
#      without Rust, the test binaries in TEST_BINS (built elsewhere with `cargo test --release
#      --no-run`; they read ../shared/fixtures relative to the checkout they were built in);
#   1. operator cases (matmul up to 4096^3, conv2d, attention, group norm): vipo GPU, vipo CPU
#      path and PyTorch; every GPU output is compared with the CPU path's (the `err` column);
#   2. the 4096^3 matmul and a conv under each VIPO_SHADER_CHECKS setting (what wgpu's run-time
#      checks cost);
#   3. the SD1.5 UNet (real config, random weights) forward at 64x64 latents, batch 1;
#   4. the LoRA Poly-DPO step, 2 pairs (batch 4), policy + reference; with f16 weights, f16
#      arithmetic, one command buffer, split-K matmuls (the opt-in switches); then once more with
#      every dispatch timed (`--profile`): how busy the GPU is, and which kernels take the time;
#   5. the same step at 1 pair with activation checkpointing: peak GPU memory at 512 px.
# Each step has a time limit so a slow one cannot starve the rest; logs and JSON go to OUT_DIR.
#
# Usage: benches/gpu_vs_pytorch.sh [OUT_DIR]     (default target/bench/gpu)
#   VIPO=path/to/vipo (default: built here, target/release/vipo), PYTHON=an interpreter with torch (CUDA)
#   and diffusers, STEP_LIMIT=seconds per step (default 150), CHECKS=0 skips step 2, HALF=0 skips the f16-weight run, CKPT=0
#   step 5, PROFILE=0 the profiled run. PyTorch runs with cuDNN's per-shape algorithm search on (TORCH_FLAGS, default
#   --cudnn-benchmark): without it, cuDNN's default fp32 algorithm for some conv shapes (640
#   channels at 32x32 on an H100) is 40x slower than for the others, which flatters vipo.
set -u -o pipefail
out=${1:-target/bench/gpu}
mkdir -p "$out"
vipo=${VIPO:-target/release/vipo}
py=${PYTHON:-python3}
tflags=${TORCH_FLAGS---cudnn-benchmark}
limit=${STEP_LIMIT:-150}
step() { echo; echo "== $* [$(date +%T)]"; }
run() { timeout "$limit" "$@"; local rc=$?; [ $rc -eq 0 ] || echo "!! exit $rc: $*"; return 0; }
# --peer FILE when PyTorch's step wrote it (vipo's numbers are still worth having without).
peer() { if "$py" -c 'import json, sys; json.load(open(sys.argv[1]))' "$1" 2>/dev/null; then echo "--peer $1"; fi; }

gpu_tests="ops_matmul_attention ops_conv_copy ops_reduce_norm ops_elementwise grads_matmul_attention grads_conv_copy
  grads_reduce_norm grads_elementwise gpu_runtime unet half_weights dpo lora autograd_checkpoint vae train_step"
split_tests="ops_matmul_attention grads_matmul_attention lora"
step "0. build and the GPU tests"
if [ -z "${VIPO:-}" ] && command -v cargo >/dev/null; then
  tests=$(printf -- '--test %s ' $gpu_tests)
  cargo build --release --locked && cargo test --release --locked --no-run $tests || exit 1
  CI=true run cargo test --release --locked $tests 2>&1 | grep -E "test result|panicked|FAILED|!! exit" | tee "$out/tests.txt"
  # The opt-in split-K matmuls under the LoRA and matmul gradient tests too.
  VIPO_MATMUL_SPLIT_K=1 CI=true run cargo test --release --locked $(printf -- '--test %s ' $split_tests) 2>&1 \
    | grep -E "test result|panicked|FAILED|!! exit" | sed 's/^/split-K: /' | tee -a "$out/tests.txt"
elif [ -n "${TEST_BINS:-}" ]; then
  for t in $gpu_tests; do echo "$t: $(CI=true run "$TEST_BINS/$t" 2>&1 | grep -E "test result|panicked|FAILED|!! exit")"; done \
    | tee "$out/tests.txt"
  for t in $split_tests; do
    echo "split-K $t: $(VIPO_MATMUL_SPLIT_K=1 CI=true run "$TEST_BINS/$t" 2>&1 | grep -E "test result|panicked|FAILED|!! exit")"
  done | tee -a "$out/tests.txt"
else
  echo "skipped: no cargo here and no TEST_BINS" | tee "$out/tests.txt"
fi

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
"$py" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
run "$vipo" devices

step "1. operators: PyTorch CUDA"
run "$py" benches/pytorch_ops.py --device cuda $tflags --json > "$out/torch_ops.json"
step "1. operators: vipo (CPU path, then the GPU)"
run "$vipo" --device gpu bench $(peer "$out/torch_ops.json") --min-time 0.3 | tee "$out/vipo_ops.txt"

step "2. wgpu run-time checks"
: > "$out/checks.txt"
[ "${CHECKS:-1}" = 0 ] && echo skipped
for c in $([ "${CHECKS:-1}" = 0 ] || echo all clamp none); do
  for f in "matmul 4096x4096" "conv2d 640ch"; do
    VIPO_SHADER_CHECKS=$c run "$vipo" --device gpu bench --filter "$f" --min-time 0.5 \
      | grep gpu | sed "s/^/checks=$c  /" | tee -a "$out/checks.txt"
  done
done

step "3-4. UNet forward and LoRA Poly-DPO step: PyTorch CUDA"
run "$py" benches/pytorch_unet.py --device cuda $tflags --repeats 5 --json > "$out/torch_unet.json"
step "3-4. UNet forward and LoRA Poly-DPO step: vipo"
run "$vipo" bench model --on gpu --repeats 2 $(peer "$out/torch_unet.json") | tee "$out/vipo_unet.txt"
step "3-4b. the same with the frozen weights in f16 (f16 storage, f32 arithmetic; no PyTorch peer)"
[ "${HALF:-1}" = 0 ] && echo skipped
[ "${HALF:-1}" = 0 ] || run "$vipo" bench model --on gpu --repeats 2 --half-weights | tee "$out/vipo_unet_f16w.txt"
step "3-4b'. the same with f16 arithmetic in the matmuls (VIPO_F16_MATH=1)"
[ "${HALF:-1}" = 0 ] && echo skipped
[ "${HALF:-1}" = 0 ] || VIPO_F16_MATH=1 run "$vipo" bench model --on gpu --repeats 2 --half-weights \
  | sed 's/f16w/f16w f16-math/' | tee "$out/vipo_unet_f16math.txt"
step "3-4d. the LoRA step as one command buffer (VIPO_DISPATCHES_PER_SUBMIT=0)"
VIPO_DISPATCHES_PER_SUBMIT=0 run "$vipo" bench model --on gpu --repeats 2 $(peer "$out/torch_unet.json") \
  | grep step | sed 's/step/step one-submit/' | tee "$out/vipo_unet_onesubmit.txt"

step "3-4e. the LoRA step with split-K matmuls for the adapters' gradients (VIPO_MATMUL_SPLIT_K=1)"
VIPO_MATMUL_SPLIT_K=1 run "$vipo" bench model --on gpu --repeats 2 $(peer "$out/torch_unet.json") \
  | grep step | sed 's/step/step split-K/' | tee "$out/vipo_unet_splitk.txt"

step "3-4c. where the GPU time goes (--profile: phases, kernels)"
[ "${PROFILE:-1}" = 0 ] && echo skipped
[ "${PROFILE:-1}" = 0 ] || run "$vipo" bench model --on gpu --repeats 2 --profile | tee "$out/vipo_unet_profile.txt"

step "5. 512 px LoRA Poly-DPO step, 1 pair, activation checkpointing"
[ "${CKPT:-1}" = 0 ] && echo skipped
[ "${CKPT:-1}" = 0 ] || run "$py" benches/pytorch_unet.py --device cuda $tflags --pairs 1 --checkpointing --repeats 2 --json \
  > "$out/torch_unet_ckpt.json"
[ "${CKPT:-1}" = 0 ] || run "$vipo" bench model --on gpu --pairs 1 --checkpointing --repeats 1 $(peer "$out/torch_unet_ckpt.json") \
  | tee "$out/vipo_unet_ckpt.txt"

step summary
cat "$out/tests.txt" "$out/vipo_ops.txt" "$out/checks.txt" "$out/vipo_unet.txt" "$out/vipo_unet_f16w.txt" "$out/vipo_unet_f16math.txt" \
  "$out/vipo_unet_onesubmit.txt" "$out/vipo_unet_splitk.txt" "$out/vipo_unet_profile.txt" "$out/vipo_unet_ckpt.txt" 2>/dev/null | grep -v "cpu ("
