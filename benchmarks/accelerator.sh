#!/usr/bin/env bash
# The accelerator measurements of docs/speed.md in one go, each step under its own time limit,
# all output in one log:
#
#   bash benchmarks/accelerator.sh LOGDIR [STEP ...]
#
# Steps (all by default, in this order; about 7 minutes on one H200):
#   demo     the demo's first run (python run.py, no compilation cache): programs, compile, wall
#   speed    benchmarks/criticality_speed.py, ResNet-50, 1,000 JPEGs, batch 250, legs a and b:
#            ours against the paper's procedure, and ours split by phase
#   sweep    benchmarks/sweep_speed.py, three ResNet-50s, 1,000 JPEGs, batch 500, all 54 layers
#   autotune leg a of `speed` again with XLA's GPU autotuner off (--xla_gpu_autotune_level=0)
#            and at level 2: what autotuning costs the first run in compile and buys in compute
#
# LOGDIR/accelerator.log gets every step's command, output, exit status and wall time;
# LOGDIR/summary.txt the lines that carry the figures. PYTHON chooses the interpreter; IMAGES,
# BATCH and SWEEP_BATCH (1000, 250, 500) shrink the work to try the script on a CPU.
set -u
log_dir=${1:?usage: bash benchmarks/accelerator.sh LOGDIR [demo speed sweep autotune]}
shift
steps=${*:-demo speed sweep autotune}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$log_dir" || exit 2
log=$log_dir/accelerator.log
summary=$log_dir/summary.txt
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
: > "$log"
: > "$summary"

# The lines that carry figures: programs and phases, each leg's line, ratios, the sweep's table.
figures='(compiled [0-9]+ programs|took [0-9.]+ s:|^a ours|^b paper|b/a:|wall s|^  [0-9] resnet50|all models|overhead of model|device busy|^the paper.s study|^  on )'

# step NAME LIMIT_S COMMAND...: runs COMMAND under `timeout`; its output goes to the log, its
# figures to the summary.
step() {
  local name=$1 limit=$2
  shift 2
  local out=$work/step.out start=$SECONDS rc
  echo "=== $name: $*" | tee -a "$summary" >> "$log"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" > "$out" 2>&1
  rc=$?
  cat "$out" >> "$log"
  grep -E "$figures" "$out" | sed -E 's/^I[0-9]{4} [0-9:.]+ +[0-9]+ progress.py:[0-9]+\] //' \
    >> "$summary"
  echo "=== $name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$summary" >> "$log"
}

{
  date -u
  nvidia-smi -L 2>/dev/null
  "$python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__,
"devices", jax.devices())'
} >> "$log" 2>&1

images=${IMAGES:-1000}
speed=(benchmarks/criticality_speed.py --num_images="$images" --batch_size="${BATCH:-250}"
       --torch_workers=8)
for name in $steps; do
  case $name in
    demo)
      step demo 150 "$python" run.py --workdir="$work/demo" --config.compilation_cache_dir=none ;;
    speed)
      step speed 300 "$python" "${speed[@]}" --workdir="$work/speed" --legs=a,b ;;
    sweep)
      step sweep 240 "$python" benchmarks/sweep_speed.py --workdir="$work/sweep" --num_models=3 \
        --num_images="$images" --batch_size="${SWEEP_BATCH:-500}" --trials=1 ;;
    autotune)
      for level in 0 2; do
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=$level" \
          step "autotune level $level" 120 "$python" "${speed[@]}" --workdir="$work/speed" --legs=a
      done ;;
    *)
      echo "unknown step $name (demo, speed, sweep, autotune)" >&2
      exit 2 ;;
  esac
done

cat "$summary"
