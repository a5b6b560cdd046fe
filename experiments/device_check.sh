#!/usr/bin/env bash
# The accelerator checks of the throughput work (issue 11), as one run on a GPU or TPU machine.
#
#   bash experiments/device_check.sh [OUT_DIR]          # default OUT_DIR: ./device_check
#
# Needs JAX built for the machine's accelerator (`pip install -e ".[gpu]"` or `".[tpu]"`); run
# from the repository root. Without network, put the wheels of missing packages (e.g.
# ml-collections, datasets, tensorboardX) in ./.whl: they are installed into /tmp/site first.
# Every figure goes to OUT_DIR/*.log, with a summary of the lines worth quoting in
# OUT_DIR/summary.txt; each step has its own time limit, so one hang does not eat the rest, and
# the steps together stay under 9 minutes (bench_layouts, which needs ../shared/data, aside).
#
# 1. the accelerator-marked tests: cuDNN (GPU) or splash (TPU) attention against the einsum;
# 2. bench_step: a Llama-1B-shaped DIL step and a Llama-3-8B-shaped 2-layer slice, bf16,
#    T = 2048, chunked LM head: tokens/s, ratio to the measured matmul peak, MFU against the
#    chip's datasheet peak (the target: MFU >= 0.45);
# 3. bench_logsumexp: the head's log-sum-exp on this backend;
# 4. bench_layouts on UltraFeedback (when ../shared/data is present): padding and MFU per layout.
set -u
OUT=${1:-device_check}
PY=${PYTHON:-python3}  # the interpreter that has JAX for this accelerator
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
platform=$("$PY" -c "import jax; print(jax.devices()[0].platform)") || exit 1
echo "platform: $platform" | tee "$OUT/summary.txt"
"$PY" -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/summary.txt"

step() {  # step NAME SECONDS COMMAND...: runs it, logs it, keeps going whatever its status
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $?" | tee -a "$OUT/summary.txt"
}

case $platform in
  gpu | cuda) marker=gpu; jax_platform=cuda ;;
  tpu) marker=tpu; jax_platform=tpu ;;
  *) echo "no accelerator visible to JAX ($platform): nothing to check" | tee -a "$OUT/summary.txt"; exit 1 ;;
esac
step tests 120 env JAX_PLATFORMS=$jax_platform "$PY" -m pytest -q -n 0 -m "$marker" -rfEs tests/test_packing.py
# Pairs per step: 2 for the 16-layer 1B shape (fp32 master weights, Adam and the reference
# take ~30 GB before activations), 4 for the 2-layer slice.
for run in 1b:2 8b_slice:4; do
  step "bench_step_${run%:*}" 180 "$PY" experiments/bench_step.py --size=${run%:*} \
    --batch=${run#*:} --seq=2048 --dtype=bfloat16 --seq_chunk=512 --steps=5
done
step bench_logsumexp 60 "$PY" experiments/bench_logsumexp.py
if [ -d ../shared/data ]; then
  step bench_layouts 300 "$PY" experiments/bench_layouts.py --data=ultrafeedback --max_length=1024 \
    --steps=4 --rows=8 --pairs=8 --width=2048 --layers=4 --dtype=bfloat16
fi
grep -h -E "passed|failed|skipped|^device|^model|tokens/s|ratio to matmul|^MFU|speed-up|x faster|^packed|^padded" \
  "$OUT"/*.log >>"$OUT/summary.txt"
cat "$OUT/summary.txt"
