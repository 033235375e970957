#!/usr/bin/env bash
# The ablation ladder of issue 17: from PGD-AT to Generalist-D one change at a time, so the
# table says which change costs or buys what. Every rung gets the same data, model, epochs,
# attack budget and seeds; each run is trained, then its best (selected on validation) and last
# global models are evaluated with AutoAttack (standard) under ℓ∞ and ℓ2, and
# experiments/ladder_summary.py prints mean ± std over the seeds.
#
#   rung 1  PGD-AT, its own lr schedule, the raw learner deployed (merge.ema_decay=0)
#   rung 2  + the deployed EMA (the pgd-at preset as shipped: ema_decay auto)
#   rung 3  + Generalist-D's lr schedule and weight decay (generalist-d's robust learner alone)
#   rung 4  Generalist-D with γ_adv ≡ 1 (the natural learner trains, is redistributed into,
#           and is never mixed)
#   rung 5  Generalist-D as shipped
#   rung 6  Generalist-D with a TRADES robust learner
#   rung 7  (not run by default) rung 5 with one copy θ_i ← θ_g at the end of each redistribution
#           epoch (policy once_per_c_epochs) instead of one at every step of it: in a short run
#           the redistribution epochs are consecutive, so the official per-step policy holds
#           every learner at θ_g for the whole last third of the run
#   rung 8  rung 5 with redistributions at least 2 epochs apart (merge.redistribute.min_gap=2;
#           the same epochs as rung 5 wherever the laid grid is already that sparse, E = 120)
#   rungs 9, 10, 11  rung 5 with the official rule at communication period c = 1, 3, 7 epochs
#           (unit epoch, start 75: meant for E = 120, where c = 5 is rung 5)
#   rung 12 rung 5 whose natural learner uses Adam (experiments/ladder/rung12-natural-adam.yaml)
#   rung 0  standard training (not a rung: the clean accuracy the model reaches without attacks,
#           the headroom the ladder is about)
#
# Usage (every value is an environment variable; finished runs and evaluations are skipped, so
# the script can be stopped and started again):
#   experiments/ladder.sh                        # CIFAR-10 subset, 3 seeds, 2 jobs at a time
#   DATASET=mnist EPOCHS=8 experiments/ladder.sh # MNIST, the second testbed
#   DATASET=digits experiments/ladder.sh         # digits at E = 10 (minutes)
#   RUNGS="1 5" SEEDS=0 experiments/ladder.sh    # a subset
#   STAGES=summary experiments/ladder.sh         # only the table
#
# Records. Run directories (weights, checkpoints) stay in RUNS, outside git; a run whose training
# and evaluations are done is also copied, without weights, to RECORDS (config, manifest,
# metrics, summary and the AutoAttack eval.json files, ~40 kB), which is committed: the tables
# are built from RECORDS, so they regenerate in a later session on a fresh machine, and a
# (rung, seed) already recorded there is not run again (delete its folder to rerun it). RECORDS
# holds one protocol: its protocol.txt names it, and a ladder with other settings stops with a
# one-line error instead of mixing them (set RECORDS to a new folder).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
DATASET=${DATASET:-cifar10}
RUNS=${RUNS:-$ROOT/experiments/runs/ladder-$DATASET}
SEEDS=${SEEDS:-0 1 2}
RUNGS=${RUNGS:-0 1 2 3 4 5 6}
JOBS=${JOBS:-2}                    # runs in parallel, one thread each
AA_N=${AA_N:-}                     # AutoAttack test points (first N of the test split; "all")
STAGES=${STAGES:-train eval summary}
RECORDS=${RECORDS:-$ROOT/experiments/records/ladder-$DATASET}
case $DATASET in
cifar10)
  DATA_DIR=${DATA_DIR:-/work/shared/data/cifar10-subset/cifar-10-batches-py}
  MODEL=${MODEL:-mnist-bn-cnn}
  # Measured 2026-12-01 (one thread per run, two runs on the 2-core machine): a 10-epoch run
  # trains in 160-235 s, one AutoAttack evaluation (Linf + L2, 500 points) takes 400-490 s;
  # standard training (rung 0) reaches 43.9 +- 2.4 % clean test accuracy. The whole ladder
  # (18 runs, best and last evaluated) is about five core-hours: ~2.5 h at 2 jobs.
  EPOCHS=${EPOCHS:-10}
  TRAIN_LIMIT=${TRAIN_LIMIT:-null}
  VAL_SIZE=${VAL_SIZE:-400}
  AA_N=${AA_N:-500}                # of the subset's 932 test images
  LINF_EPS=${LINF_EPS:-8/255} LINF_STEP=${LINF_STEP:-2/255}
  THREATS=${THREATS:-Linf:8/255 L2:0.5} ;;
mnist)
  DATA_DIR=${DATA_DIR:-/work/shared/data/mnist}
  MODEL=${MODEL:-mnist-bn-cnn}
  EPOCHS=${EPOCHS:-8}
  TRAIN_LIMIT=${TRAIN_LIMIT:-6000}
  VAL_SIZE=${VAL_SIZE:-300}
  AA_N=${AA_N:-500}
  LINF_EPS=${LINF_EPS:-0.3} LINF_STEP=${LINF_STEP:-0.04}
  THREATS=${THREATS:-Linf:0.3 L2:2.0} ;;
digits)  # scikit-learn's 8x8 digits (ships with it): the demo's data, seconds per run
  DATA_DIR=${DATA_DIR:-}
  MODEL=${MODEL:-tiny-cnn}
  EPOCHS=${EPOCHS:-10}
  TRAIN_LIMIT=${TRAIN_LIMIT:-null}
  VAL_SIZE=${VAL_SIZE:-0.1}
  AA_N=${AA_N:-all}                # the whole test split
  LINF_EPS=${LINF_EPS:-0.2} LINF_STEP=${LINF_STEP:-0.05}
  THREATS=${THREATS:-Linf:0.2 L2:1.0} ;;
*) echo "DATASET=$DATASET: use cifar10, mnist or digits" >&2; exit 2 ;;
esac
PGD_STEPS=${PGD_STEPS:-10}
TEST_PGD_EXAMPLES=${TEST_PGD_EXAMPLES:-500}
# Everything that makes two runs of one rung and seed comparable (not where the data lives).
PROTOCOL="dataset=$DATASET model=$MODEL epochs=$EPOCHS train_limit=$TRAIN_LIMIT val_size=$VAL_SIZE"
PROTOCOL+=" linf_eps=$LINF_EPS linf_step=$LINF_STEP pgd_steps=$PGD_STEPS"
PROTOCOL+=" test_pgd_examples=$TEST_PGD_EXAMPLES autoattack=$AA_N threats=${THREATS// /,}"

# Same data, model, epochs and ℓ∞ training budget for every rung (the presets differ in ε on
# CIFAR-10: pgd-at uses 8/255, generalist-d the official 0.031).
COMMON=(
  --dataset "$DATASET" ${DATA_DIR:+--data-dir "$DATA_DIR"} --epochs "$EPOCHS"
  --set "model.name=$MODEL" --set "data.train_limit=$TRAIN_LIMIT" --set "data.val_size=$VAL_SIZE"
  --set "budgets.Linf.eps=$LINF_EPS" --set "budgets.Linf.steps=$PGD_STEPS"
  --set "budgets.Linf.step_size=$LINF_STEP" --set "eval.test_examples=$TEST_PGD_EXAMPLES"
  --no-progress
)

rung_args() {  # the preset and settings of rung $1
  case $1 in
  0) echo "--preset standard" ;;
  1) echo "--preset pgd-at --set merge.ema_decay=0" ;;
  2) echo "--preset pgd-at" ;;
  3) echo "--preset generalist-d --config $ROOT/experiments/ladder/rung3-pgd-at-generalist-schedule.yaml" ;;
  4) echo "--preset generalist-d --set learners.adv_linf.gamma=1.0" ;;
  5) echo "--preset generalist-d" ;;
  6) echo "--preset generalist-d --config $ROOT/experiments/ladder/rung6-generalist-d-trades.yaml" ;;
  7) echo "--preset generalist-d --set merge.redistribute.policy=once_per_c_epochs" ;;
  8) echo "--preset generalist-d --set merge.redistribute.min_gap=2" ;;
  # The paper's communication-period ablation at E = 120 (unit epoch, from epoch 75; c = 5 is
  # rung 5 itself there) and its natural learner with Adam.
  9) echo "--preset generalist-d --set merge.redistribute.unit=epoch --set merge.redistribute.start=75 --set merge.redistribute.every=1" ;;
  10) echo "--preset generalist-d --set merge.redistribute.unit=epoch --set merge.redistribute.start=75 --set merge.redistribute.every=3" ;;
  11) echo "--preset generalist-d --set merge.redistribute.unit=epoch --set merge.redistribute.start=75 --set merge.redistribute.every=7" ;;
  12) echo "--preset generalist-d --config $ROOT/experiments/ladder/rung12-natural-adam.yaml" ;;
  *) echo "unknown rung $1 (0-12)" >&2; return 2 ;;
  esac
}

run_dir() { ls -d "$1/$2"-2* 2>/dev/null | tail -n 1 || true; }

record() {  # record RUN_DIR: its files without weights into RECORDS, whole or not at all
  local dir=$1 file tmp
  tmp="$RECORDS/.tmp-$(basename "$dir")"
  rm -rf "$tmp"
  for file in config.yaml manifest.json metrics.jsonl summary.json model.json model-best.json \
    eval-aa-best/eval.json eval-aa-best/results.md eval-aa-last/eval.json eval-aa-last/results.md; do
    if [ -f "$dir/$file" ]; then mkdir -p "$(dirname "$tmp/$file")" && cp "$dir/$file" "$tmp/$file"; fi
  done
  mv "$tmp" "$RECORDS/$(basename "$dir")"
}

one_run() {  # one_run RUNG SEED: train (unless finished), then AutoAttack on best and last
  local rung=$1 seed=$2 name="r$1-s$2" dir recorded last_is_best which threat threats=()
  for threat in $THREATS; do threats+=(--threat "$threat"); done
  if [ "$AA_N" != all ]; then threats+=(--n-examples "$AA_N"); fi
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  recorded=$(run_dir "$RECORDS" "$name")
  if [ -n "$recorded" ]; then
    echo "$(date -u +%FT%TZ) recorded $name: $recorded"
    return
  fi
  dir=$(run_dir "$RUNS" "$name")
  if [[ " $STAGES " == *" train "* ]] && { [ -z "$dir" ] || [ ! -f "$dir/summary.json" ]; }; then
    if [ -n "$dir" ] && [ -f "$dir/config.yaml" ]; then
      # An unfinished earlier attempt (a session ended, a machine stopped) continues where its
      # last checkpoint left it; manifest.json records each resume, RESULTS.md names them.
      "$PYTHON" -m generalist train --resume "$dir" --no-progress >>"$RUNS/$name.log" 2>&1
    else
      if [ -n "$dir" ]; then rm -rf "$dir"; fi  # died before its config was written: start again
      # shellcheck disable=SC2046  # rung_args is a list of words on purpose
      "$PYTHON" -m generalist train $(rung_args "$rung") "${COMMON[@]}" --set "seed=$seed" \
        --out "$RUNS" --name "$name" >"$RUNS/$name.log" 2>&1
    fi
    dir=$(run_dir "$RUNS" "$name")
  fi
  if [[ " $STAGES " == *" eval "* ]] && [ -n "$dir" ] && [ -f "$dir/summary.json" ]; then
    last_is_best=false
    if cmp -s "$dir/model.safetensors" "$dir/model-best.safetensors"; then last_is_best=true; fi
    for which in best last; do
      # A last model byte-identical to the best one (best chosen at the last epoch) would give
      # the same numbers (AutoAttack is seeded); ladder_summary.py reads best's evaluation for it.
      if [ $which = last ] && $last_is_best; then continue; fi
      if [ ! -f "$dir/eval-aa-$which/eval.json" ]; then
        rm -rf "$dir/eval-aa-$which"
        "$PYTHON" -m generalist eval "$dir" --model "$which" --attacks autoattack \
          "${threats[@]}" --split test --out "$dir/eval-aa-$which" \
          --no-progress >>"$RUNS/$name.log" 2>&1
      fi
    done
    # Recorded only when both evaluations exist (the last one may be the best one's).
    if [ -f "$dir/eval-aa-best/eval.json" ] && { [ -f "$dir/eval-aa-last/eval.json" ] || $last_is_best; }; then
      record "$dir"
    fi
  fi
  echo "$(date -u +%FT%TZ) done $name"
}
export -f one_run rung_args run_dir record
export ROOT PYTHON DATASET RUNS RECORDS THREATS AA_N STAGES
export COMMON_ARGS="${COMMON[*]}"

mkdir -p "$RUNS" "$RECORDS"
if [ ! -f "$RECORDS/protocol.txt" ]; then
  echo "$PROTOCOL" >"$RECORDS/protocol.txt"
elif [ "$(cat "$RECORDS/protocol.txt")" != "$PROTOCOL" ]; then
  echo "RECORDS=$RECORDS holds runs of '$(cat "$RECORDS/protocol.txt")', not '$PROTOCOL': set RECORDS to a new folder" >&2
  exit 2
fi
started=$(date +%s)
if [[ " $STAGES " == *" train "* ]] || [[ " $STAGES " == *" eval "* ]]; then
  # Seeds outermost, so an interrupted ladder has whole sets of rungs rather than whole rungs.
  for seed in $SEEDS; do for rung in $RUNGS; do echo "$rung $seed"; done; done |
    xargs -P "$JOBS" -L 1 bash -c 'COMMON=($COMMON_ARGS); one_run "$0" "$1"'
  echo "wall time: $(($(date +%s) - started)) s for rungs $RUNGS, seeds $SEEDS, $JOBS jobs" |
    tee -a "$RUNS/wall_time.txt"
fi
if [[ " $STAGES " == *" summary "* ]]; then
  "$PYTHON" "$ROOT/experiments/ladder_summary.py" "$RECORDS" --out "$RUNS/ladder.md"
fi
