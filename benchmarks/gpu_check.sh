#!/usr/bin/env bash
# One GPU check for issue 14, within 8 minutes on one H100/H200. Writes ONE JSON file (plus the full logs beside it).
#
# On the device machine (the `run` tool), after `bash benchmarks/gpu_wheels.sh` here (builds .wheels/, ~27 MiB):
#
#   run(command="bash benchmarks/gpu_check.sh", carry=[".wheels"], timeout_s=500)
#
#   -> $OUT/gpu_check.json, $OUT/gpu_check.log. The steps share a budget of 470 s (GPU_CHECK_BUDGET_S): the last
#      one is cut at 445 s (+10 s kill grace), the report takes seconds, so 500 s is a safe limit. The machine's
#      start (a minute or more) comes on top; with 15 device minutes a session has room for one such call.
#
# Elsewhere:
#   benchmarks/gpu_check.sh [--cpu] [--install] [OUT_DIR]     # OUT_DIR, else $OUT
#   --cpu      tiny sizes on the CPU (Triton's interpreter for the fused training run): checks the plumbing
#   --install  install .wheels/ even in --cpu mode (needs a python3 the wheels fit: CPython 3.12, x86-64)
#   GPU_CHECK_STEPS=router,layer   run only these steps (the others are recorded as skipped)
#   GPU_CHECK_BUDGET_S=470         wall-clock budget of all the steps together
#   PYTHON=python3                 the interpreter (the GPU image: /opt/torch/.venv/bin/python3)
#   GPU_CHECK_KEEP=1               keep the work directory (run directories, per-step logs and results)
#
# Steps, in order, each under `timeout` (its limit, cut to what is left of the budget; a step that would get less
# than 20 s is skipped), each recorded with its status (ok, failed, timeout, skipped), exit code, seconds, result
# and the end of its log; a failed step never stops the next one:
#   install      pip install --no-index --no-deps --target /tmp/gpu_check_site .wheels/*.whl (DeepSpeed, Hydra,
#                wandb and their dependencies; the image has torch, triton, lightning)
#   versions     GPU, driver, CUDA, torch, triton, deepspeed, lightning, hydra, wandb, ...
#   ceilings     device-to-device copy GB/s and bf16 8192^3 matmul TFLOP/s, measured here (floors use them)
#   router       benchmarks/bench_router.py at the targets, T=262,144 E=64/256 k=8 (<= 40 / 80 us): the fused
#                router vs eager and torch.compile (DeepSpeed's dense masks do not fit at this T)
#   router_ds    the reference's other shapes, DeepSpeed topkgating among the baselines where it fits
#   layer        benchmarks/bench_moe_layer.py: our layer vs the loop over experts and sort + grouped_mm, TFLOP/s
#                (target >= 450 fine-grained, bf16)
#   pytest_gpu   TRITON_INTERPRET=0 pytest -m gpu (the compiled kernels against the reference; -n 4 with xdist)
#   train_triton 50 steps of `python train.py trainer=gpu router.impl=triton` with a step timer
#   train_torch  the same with router.impl=torch
#   router_sweep bench_router.py --sweep at the target shapes (tiles and top-k strategy of the Triton launcher)
set -uo pipefail

MODE=gpu
INSTALL=auto
OUT_DIR=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu | --dry-run) MODE=cpu ;;
    --install) INSTALL=yes ;;
    -h | --help)
      sed -n '2,/^set -uo/p' "$0" | sed '$d'
      exit 0
      ;;
    -*)
      echo "unknown option $1" >&2
      exit 2
      ;;
    *) OUT_DIR=$1 ;;
  esac
  shift
done
if [ -z "$OUT_DIR" ]; then
  echo "usage: benchmarks/gpu_check.sh [--cpu] [--install] OUT_DIR   (or set OUT)" >&2
  exit 2
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 2
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
RESERVE=25 # seconds kept for the report after the last step
MIN_STEP=20
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
SITE=/tmp/gpu_check_site
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
SECONDS=0
: >"$WORK/steps.tsv"

export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true MPLBACKEND=Agg HYDRA_FULL_ERROR=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ "$MODE" = gpu ]; then
  export TRITON_INTERPRET=0 DS_ACCELERATOR=cuda
fi

selected() { # is step $1 in GPU_CHECK_STEPS (all steps when unset)?
  [ -z "${GPU_CHECK_STEPS:-}" ] && return 0
  case ",$GPU_CHECK_STEPS," in *",$1,"*) return 0 ;; esac
  return 1
}

record() { # name status rc seconds limit result_file cmd...
  local name=$1 status=$2 rc=$3 secs=$4 limit=$5 result=$6
  shift 6
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$secs" "$limit" "$result" "$*" >>"$WORK/steps.tsv"
  printf '[%4ds] %-13s %-8s rc=%-4s %5ss  %s\n' "$SECONDS" "$name" "$status" "$rc" "$secs" "$*"
}

step() { # name limit_s result_file cmd...: run cmd under timeout, log to $WORK/name.log, record the outcome
  local name=$1 limit=$2 result=$3
  shift 3
  if ! selected "$name"; then
    record "$name" skipped "" "" "$limit" "" "not in GPU_CHECK_STEPS: $*"
    return 0
  fi
  local left=$((BUDGET - RESERVE - SECONDS))
  local t=$((limit < left ? limit : left))
  if [ "$t" -lt "$MIN_STEP" ]; then
    record "$name" skipped "" "" "$limit" "" "budget: ${left}s left of ${BUDGET}s: $*"
    return 0
  fi
  local t0=$SECONDS rc status
  timeout -k 10 "$t" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$t" "$result" "$*"
}

# -- install ------------------------------------------------------------------------------------------------------
wheels=(.wheels/*.whl)
if [ "$MODE" = cpu ] && [ "$INSTALL" != yes ]; then
  record install skipped "" "" "" "" "--cpu: uses this machine's packages (--install to test the wheelhouse)"
elif [ ! -e "${wheels[0]}" ]; then
  record install failed 1 0 "" "" "no wheels in .wheels/: run benchmarks/gpu_wheels.sh here and carry .wheels"
else
  step install 120 "" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
  export PYTHONPATH="$REPO:$SITE${PYTHONPATH#"$REPO"}"
fi

# -- measurements -------------------------------------------------------------------------------------------------
TARGETS="262144x64x8,262144x256x8"
if [ "$MODE" = gpu ]; then
  # the reference's other shapes; DeepSpeed's dense [T, E, capacity] masks fit only the three smallest
  OTHER_SHAPES="8192x8x2,16384x8x2,8192x64x8,65536x8x2,65536x64x8,65536x256x8,262144x8x2"
  CEIL_ARGS=()
  ROUTER_ARGS=(--shapes "$TARGETS")
  ROUTER_DS_ARGS=(--shapes "$OTHER_SHAPES" --no-compile)
  SWEEP_ARGS=(--shapes "$TARGETS" --no-compile --sweep)
  LAYER_ARGS=()
  PYTEST_ARGS=()
  if "$PY" -c "import xdist" >/dev/null 2>&1; then PYTEST_ARGS=(-n 4); fi # Triton compiles dominate
  TRAIN_ARGS=(trainer=gpu trainer.max_steps=50 trainer.val_check_interval=50 trainer.enable_progress_bar=false)
  TRITON_ENV=(env TRITON_INTERPRET=0)
else
  CEIL_ARGS=(--cpu)
  SMALL=(--warmup 1 --rounds 2 --no-compile)
  ROUTER_ARGS=(--shapes "1024x64x8,512x256x8" "${SMALL[@]}")
  ROUTER_DS_ARGS=(--shapes "512x8x2" "${SMALL[@]}" --ds-max-gb 0.5)
  SWEEP_ARGS=(--shapes "1024x64x8" "${SMALL[@]}" --sweep)
  LAYER_ARGS=(--shape "256,64,32,8,2" --warmup 1 --rounds 1)
  PYTEST_ARGS=()
  TRAIN_ARGS=(experiment=smoke trainer.max_steps=3 trainer.val_check_interval=3)
  TRITON_ENV=(env TRITON_INTERPRET=1)
fi

step versions 90 versions.json "$PY" benchmarks/gpu_check.py versions --json "$WORK/versions.json"
step ceilings 60 ceilings.json "$PY" benchmarks/gpu_check.py ceilings "${CEIL_ARGS[@]}" --json "$WORK/ceilings.json"
step router 120 router.json "$PY" benchmarks/bench_router.py "${ROUTER_ARGS[@]}" --json "$WORK/router.json"
step router_ds 90 router_ds.json "$PY" benchmarks/bench_router.py "${ROUTER_DS_ARGS[@]}" --json "$WORK/router_ds.json"
step layer 150 layer.json "$PY" benchmarks/bench_moe_layer.py "${LAYER_ARGS[@]}" --json "$WORK/layer.json"

mapfile -t GPU_TESTS < <(grep -rlE 'mark\.gpu' tests --include='test_*.py' | sort)
if [ "${#GPU_TESTS[@]}" -eq 0 ]; then
  record pytest_gpu failed 1 0 "" "" "no test file under tests/ uses pytest.mark.gpu"
else
  step pytest_gpu 150 pytest_gpu.xml "$PY" -m pytest -m gpu -q -p no:cacheprovider "${PYTEST_ARGS[@]}" \
    --continue-on-collection-errors --junitxml="$WORK/pytest_gpu.xml" "${GPU_TESTS[@]}"
fi

for impl in triton torch; do
  run_env=(env)
  [ "$impl" = triton ] && run_env=("${TRITON_ENV[@]}")
  step "train_$impl" 120 "train_$impl.json" "${run_env[@]}" "$PY" train.py "${TRAIN_ARGS[@]}" "router.impl=$impl" \
    "hydra.run.dir=$WORK/run_$impl" \
    "+callbacks.step_timer={_target_: benchmarks.bench_train_gpu.StepTimer, path: '$WORK/train_$impl.json'}"
done

step router_sweep 120 router_sweep.json "$PY" benchmarks/bench_router.py "${SWEEP_ARGS[@]}" \
  --json "$WORK/router_sweep.json"

# -- report -------------------------------------------------------------------------------------------------------
while IFS=$'\t' read -r name status _; do # every step's full log, in step order
  printf '\n===== %s: %s =====\n' "$name" "$status"
  [ -e "$WORK/$name.log" ] && cat "$WORK/$name.log"
done <"$WORK/steps.tsv" >"$OUT_DIR/gpu_check.log"
"$PY" benchmarks/gpu_check.py report --work "$WORK" --out "$OUT_DIR/gpu_check.json" --mode "$MODE" \
  --started "$STARTED" --wall-s "$SECONDS" --budget-s "$BUDGET"
rc=$?
if [ -n "${GPU_CHECK_KEEP:-}" ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
exit $rc
