#!/usr/bin/env bash
# One prepared GPU check, sized for one lent-GPU window (<= 7 minutes on an H100/H200), from a fresh machine.
#
#   bash bench/gpu_check.sh               # on the GPU machine: all parts, in order of value
#   bash bench/gpu_check.sh pipeline      # one part alone: pipeline | train | quantize (each has its own timeout)
#   bash bench/gpu_check.sh --cpu-smoke   # the same parts with tiny shapes on the CPU (about 2.5 minutes): the dry run
#
# Parts:
#   pipeline  the whole flow on the embedded default on CUDA with the GPU preset's fast paths (validate -> train
#             -> evaluate on bitsandbytes' real 4-bit kernels -> gates -> merge + fidelity gate -> GPTQ (Triton)
#             -> evaluate-quantized -> publish to a local registry); prints the run summary and the metrics
#   train     bench/train_throughput.py at the Llama-3-8B shape, 16k-token steps: seed recipe, the preset's
#             config (chunked CE), best; tokens/s, MFU (6N per token, recompute not counted), peak memory
#   quantize  bench/quantize.py: streamed merge + GPTQ on 4 layers of the 8B shape (x 8 for 32 layers)
#
# Environment: the device machine has torch, transformers, peft and accelerate. Everything else (prefect,
# great-expectations, bitsandbytes, gptqmodel, optimum, datasets, huggingface-hub, their dependencies and this
# package) must travel as wheels in ./.whl (built here with `pip download -d .whl -r requirements.lock` for
# the device's Python, minus torch), carried with the working tree; the script installs them offline. Without
# ./.whl it uses the Python it finds (the CPU smoke runs in .venv).
# Output: $OUT/gpu_check.md (one table per part) and $OUT/<part>.log; OUT defaults to ./gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
SMOKE=0
PARTS=()
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    pipeline|train|quantize) PARTS+=("$arg") ;;
    *) echo "usage: $0 [--cpu-smoke] [pipeline] [train] [quantize]" >&2; exit 2 ;;
  esac
done
((${#PARTS[@]})) || PARTS=(pipeline train quantize)

PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
if ((SMOKE == 0)) && [ -d .whl ]; then
  echo "installing carried wheels from ./.whl (offline)"
  $PY -m pip install -q --no-index --find-links .whl -r requirements.lock 2>&1 | tail -3
  $PY -m pip install -q --no-index --find-links .whl --no-deps -e . 2>&1 | tail -3
fi
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
WORK=${WORK:-/tmp/qlora-gpu-check}
mkdir -p "$WORK"
SUMMARY=$OUT/gpu_check.md
echo "# gpu_check $(date -u +%FT%TZ) smoke=$SMOKE on $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")' 2>/dev/null)" > "$SUMMARY"

part() {  # part NAME TIMEOUT_S CMD...: run with its own timeout; log to $OUT/NAME.log; table lines to the summary
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  # The benchmarks end with their table; the pipeline's summary is added below.
  { echo; echo "## $name: exit $rc in $((SECONDS - start)) s"
    [ "$name" = pipeline ] || { echo '```'; sed 's/\x1b\[[0-9;]*m//g' "$OUT/$name.log" | grep -v -E '^(INFO|WARN|W[0-9])' \
                                | tail -n 12; echo '```'; }; } >> "$SUMMARY"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
}

if ((SMOKE)); then
  DEVICE=cpu
  PIPELINE_SET=(--set train.max_steps=2 --set train.tokens_per_step=256 --set eval.max_examples=8
                --set eval.exact_match_examples=2 --set quantize.calibration_examples=8
                --set quantize.calibration_seq_len=64 --set quantize.calibration_batch_size=4
                --set gates.max_perplexity=1e9 --set gates.min_perplexity_gain=-1
                --set gates.max_quantized_perplexity_increase=1)
  SHAPE=(--device cpu --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 2048)
  TRAIN=("${SHAPE[@]}" --tokens-per-step 256 --small-tokens 64 --steps 1 --warmup 0 --rows seed,base,chunked)
  QUANT=("${SHAPE[@]}" --samples 4 --seq-len 64)
  LIMITS=(300 150 150)  # generous: the smoke checks that every part runs, not how fast (a slow CI CPU hit 45 s)
else
  DEVICE=cuda
  # The preset's fast paths (pipeline_config/presets/llama3-8b-qlora-gpu.yaml) on the embedded default.
  PIPELINE_SET=(--set train.loss_chunk_tokens=1024 --set train.tokens_per_step=2048)
  TRAIN=(--rows seed,base,chunked,best --steps 3)
  QUANT=(--layers 4)
  LIMITS=(240 240 150)
fi

for p in "${PARTS[@]}"; do
  case $p in
    pipeline) $PY -m flows.cli prepare-assets > "$OUT/assets.log" 2>&1 || { echo "prepare-assets failed"; tail "$OUT/assets.log"; }
              part pipeline "${LIMITS[0]}" env GPTQMODEL_CPU_WORKERS=2 $PY -m flows.cli run "${PIPELINE_SET[@]}" \
                --set device=$DEVICE --set artifacts.root="$WORK/artifacts" --set publish.registry="$WORK/registry" \
              && { sed -n '/run summary:/,/^total/p' "$OUT/pipeline.log" | sed 's/^/    /' >> "$SUMMARY"
                   find "$WORK/artifacts/objects" -name metrics.json -newer "$OUT/gpu_check.md" -exec cat {} + \
                     2>/dev/null | head -c 4000 > "$OUT/pipeline_metrics.json"; } ;;
    train) part train "${LIMITS[1]}" $PY bench/train_throughput.py "${TRAIN[@]}" --model-dir "$WORK/model-train" ;;
    quantize) part quantize "${LIMITS[2]}" $PY bench/quantize.py "${QUANT[@]}" --workdir "$WORK/quantize" ;;
  esac
done
cat "$SUMMARY"
