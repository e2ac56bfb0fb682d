#!/usr/bin/env bash
# GPU acceptance: the CPU quickstart's code path on a CUDA machine, one table at the end.
#
#   scripts/gpu_acceptance.sh [--dry-run] [--budget-s S] [--out DIR]
#
# Installs the GPU target (MOPD_TARGET=gpu: the official CUDA vLLM and DeepSpeed; on a machine without network
# set MOPD_WHEELS=DIR to install from a folder of wheels instead), builds the quickstart world, then trains the
# bf16-engine quickstart variant (configs/quickstart_bf16.yaml: bf16 vLLM engines against the fp32 trainer, a real
# train/inference mismatch) with R3 routing capture on, each run for --budget-s seconds of step time:
#   dedicated      engines and trainer in their own actors, fractions of the GPU each
#   colocated      the student engine in the trainer's actor (only if this checkout has rollout.colocate)
#   2 workers      two data-parallel trainer workers (only with >= 2 GPUs: NCCL needs a GPU per rank)
# and prints tokens/s, the step's stage breakdown, summed memory, router agreement and after/teacher per domain
# (benchmarks/run_table.py). About 8-10 minutes on one GPU with the default budget. --dry-run prints every command
# without running any (no GPU needed); the config of every run is still loaded and validated.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
BUDGET=60
OUT=runs/gpu_acceptance
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget-s) BUDGET="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance: error: unknown argument $1 (allowed: --dry-run, --budget-s S, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) echo "gpu_acceptance: error: --budget-s takes whole seconds, got '$BUDGET'" >&2; exit 2 ;; esac

if command -v nvidia-smi >/dev/null 2>&1; then
  GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
else
  GPUS=0
fi
if [ "$GPUS" -eq 0 ] && [ "$DRY" -eq 0 ]; then
  echo "gpu_acceptance: error: no GPU (nvidia-smi found none); run with --dry-run to see the plan" >&2
  exit 2
fi
PLAN_GPUS=$(( GPUS > 0 ? GPUS : 1 ))  # a dry run on a CPU machine plans for one GPU

run() {  # print, and run unless --dry-run
  echo "+ $*"
  [ "$DRY" -eq 1 ] || "$@"
}

MOPD=.venv/bin/mopd
CONFIG=configs/quickstart_bf16.yaml
# One GPU shared by five actors: the student engine and three teacher engines (vLLM, 12% of its memory each;
# teachers take rollout's GPU share by default) and the trainer.
COMMON=(
  "algorithm.r3_capture=true"
  "rollout.num_gpus_per_engine=0.15" "rollout.num_cpus_per_engine=1" "rollout.gpu_memory_utilization=0.12"
  "rollout.omp_threads=2" "trainer.num_gpus=0.2" "trainer.num_cpus=2" "ray.num_cpus=$(nproc)"
  "trainer.max_wallclock_s=$BUDGET" "trainer.schedule_horizon=wallclock" "trainer.save_every=0" "trainer.eval_every=0"
  "data.eval_size_per_domain=100" "logging.progress_every_s=15"
)
NAMES=(dedicated)
declare -A OVERRIDES=([dedicated]="")
if grep -q "^    colocate:" mopd/config.py; then
  NAMES+=(colocated)
  OVERRIDES[colocated]="rollout.colocate=true"
else
  echo "gpu_acceptance: colocated run skipped: this checkout has no rollout.colocate"
fi
if [ "$PLAN_GPUS" -ge 2 ]; then
  NAMES+=(workers2)
  OVERRIDES[workers2]="trainer.num_workers=2 trainer.num_gpus=1"
else
  echo "gpu_acceptance: two-worker run skipped: $PLAN_GPUS GPU (NCCL needs one GPU per trainer worker)"
fi

t0=$(date +%s)
if [ -n "${MOPD_WHEELS:-}" ]; then
  run env MOPD_TARGET=gpu PIP_NO_INDEX=1 PIP_FIND_LINKS="$MOPD_WHEELS" bash scripts/setup.sh
else
  run env MOPD_TARGET=gpu bash scripts/setup.sh
fi
run "$MOPD" world build "$CONFIG"
DIRS=()
for name in "${NAMES[@]}"; do
  # shellcheck disable=SC2206  # the overrides are words
  extra=(${OVERRIDES[$name]})
  args=("$CONFIG" "${COMMON[@]}" "${extra[@]}" "experiment=gpu_$name" "logging.run_dir=$OUT/$name")
  if [ "$DRY" -eq 1 ] && [ -x "$MOPD" ]; then  # the plan's configs load, or the dry run says why
    "$MOPD" config show "${args[@]}" >/dev/null
  fi
  run "$MOPD" train "${args[@]}" --overwrite
  DIRS+=("$OUT/$name")
done
run .venv/bin/python benchmarks/run_table.py "${DIRS[@]}"
[ "$DRY" -eq 1 ] || echo "gpu_acceptance: done in $(( $(date +%s) - t0 )) s on $GPUS GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)"
