#!/usr/bin/env bash
# Regenerates every number in RESULTS.md: trains each method, runs AutoAttack on its global
# model, then builds the tables and the report. Not part of CI (it takes hours on a CPU).
#
# The defaults are the *reduced* protocol that fit a shared 2-core CPU in about two hours (see
# RESULTS.md, "Protocol"). For the issue's full protocol on a GPU, change the variables, e.g.
#   MODEL=small-cnn TRAIN_LIMIT=null EPOCHS=50 PGD_STEPS=40 LINF_STEP=0.01 L2_STEP=0.125 \
#   VAL_SIZE=0.02 AA_N=10000 SEEDS_ALL="0 1 2" CIFAR_MODEL=resnet18 CIFAR_EPOCHS=120 \
#   CIFAR_METHODS="standard pgd-at trades fat cure generalist-d generalist-m generalist-t" \
#   THREADS=0 experiments/run_all.sh
# Every value is an environment variable. Finished runs and evaluations are skipped, so the
# script can be stopped and started again; STAGES picks what to run.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
GENERALIST=("$PYTHON" -m generalist)  # mnist-bn-cnn is in the model registry (models/cnn.py)
RUNS=${RUNS:-$ROOT/experiments/runs}
MNIST_DIR=${MNIST_DIR:-/work/shared/data/mnist}
CIFAR_DIR=${CIFAR_DIR:-/work/shared/data/cifar10-subset/cifar-10-batches-py}

# MNIST (main grid, key seeds, ablation)
MODEL=${MODEL:-mnist-bn-cnn}       # the MNIST profile's model is small-cnn (TRADES' SmallCNN)
TRAIN_LIMIT=${TRAIN_LIMIT:-6000}   # fixed training subset (same for every run); null = all
EPOCHS=${EPOCHS:-8}
PGD_STEPS=${PGD_STEPS:-10}         # training PGD steps (profile: 40)
LINF_STEP=${LINF_STEP:-0.04}       # profile: 40 x 0.01; 10 x 0.04 keeps the same path length
L2_STEP=${L2_STEP:-0.5}            # profile: 40 x 0.125; 10 x 0.5 keeps the same path length
VAL_SIZE=${VAL_SIZE:-300}          # validation images carved from the training split
SEEDS_ALL=${SEEDS_ALL:-0}
SEEDS_KEY=${SEEDS_KEY:-0 1 2}
METHODS=${METHODS:-standard pgd-at trades fat cure generalist-d generalist-m generalist-t}
KEY_METHODS=${KEY_METHODS:-pgd-at generalist-d}
# CIFAR-10 subset: the cifar10 profile (10-step PGD, crop + flip) with a small model
CIFAR_MODEL=${CIFAR_MODEL:-mnist-bn-cnn}
CIFAR_TRAIN_LIMIT=${CIFAR_TRAIN_LIMIT:-null}
CIFAR_EPOCHS=${CIFAR_EPOCHS:-8}
CIFAR_VAL_SIZE=${CIFAR_VAL_SIZE:-200}
CIFAR_SEEDS=${CIFAR_SEEDS:-0}
CIFAR_METHODS=${CIFAR_METHODS:-standard pgd-at generalist-d}
CIFAR_KEY_SEEDS=${CIFAR_KEY_SEEDS:-0 1 2}  # more seeds for KEY_METHODS on CIFAR
# both datasets
TEST_PGD_EXAMPLES=${TEST_PGD_EXAMPLES:-500}  # the training loop's own PGD-20 test (summary.json)
AA_N=${AA_N:-100}                  # AutoAttack test points per norm (first N of the test split)
THREADS=${THREADS:-1}              # torch threads; 1 was fastest on the shared 2-core machine
STAGES=${STAGES:-main key ablation cifar summary}

if [ "$THREADS" != 0 ]; then export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS; fi
mkdir -p "$RUNS/mnist" "$RUNS/cifar10"
TIMES=$RUNS/wall_times.tsv

mnist_args=(
  --dataset mnist --data-dir "$MNIST_DIR" --epochs "$EPOCHS"
  --set "model.name=$MODEL" --set "data.train_limit=$TRAIN_LIMIT" --set "data.val_size=$VAL_SIZE"
  --set "budgets.Linf.steps=$PGD_STEPS" --set "budgets.Linf.step_size=$LINF_STEP"
  --set "budgets.L2.steps=$PGD_STEPS" --set "budgets.L2.step_size=$L2_STEP"
  --set "eval.test_examples=$TEST_PGD_EXAMPLES"
)
mnist_threats=(--threat Linf:0.3 --threat L2:2.0)
cifar10_args=(
  --dataset cifar10 --data-dir "$CIFAR_DIR" --epochs "$CIFAR_EPOCHS"
  --set "model.name=$CIFAR_MODEL" --set "data.train_limit=$CIFAR_TRAIN_LIMIT"
  --set "data.val_size=$CIFAR_VAL_SIZE" --set "eval.test_examples=$TEST_PGD_EXAMPLES"
)
cifar10_threats=(--threat Linf:8/255 --threat L2:0.5)

# shellcheck source=experiments/common.sh
source "$ROOT/experiments/common.sh"  # timed, run_dir

train_and_eval() {  # train_and_eval DATASET NAME PRESET SEED [extra --set ...]
  local dataset=$1 name=$2 preset=$3 seed=$4 dir
  shift 4
  local -n args="${dataset}_args" threats="${dataset}_threats"
  dir=$(run_dir "$dataset" "$name")
  if [ -z "$dir" ] || [ ! -f "$dir/summary.json" ]; then
    if [ -n "$dir" ]; then rm -rf "$dir"; fi  # unfinished earlier attempt: start again
    timed "train $dataset/$name" "${GENERALIST[@]}" train --preset "$preset" "${args[@]}" \
      --set "seed=$seed" "$@" --out "$RUNS/$dataset" --name "$name" --no-progress
    dir=$(run_dir "$dataset" "$name")
  fi
  if [ ! -f "$dir/eval-aa/eval.json" ]; then
    rm -rf "$dir/eval-aa"
    timed "autoattack $dataset/$name" "${GENERALIST[@]}" eval "$dir" --attacks autoattack \
      "${threats[@]}" --n-examples "$AA_N" --split test --out "$dir/eval-aa" --no-progress
  fi
}

report() {  # report DATASET: tables from every run, figures from the method runs (no ablation)
  local dataset=$1 dir
  local method_runs=()
  "$PYTHON" "$ROOT/experiments/summarize.py" "$RUNS/$dataset" --out "$RUNS/$dataset-tables.md"
  "${GENERALIST[@]}" compare "$RUNS/$dataset" --markdown --out "$RUNS/$dataset-compare.md" \
    >/dev/null
  for dir in "$RUNS/$dataset"/*/; do
    case $(basename "$dir") in gd-*) ;; *) method_runs+=("$dir") ;; esac
  done
  "${GENERALIST[@]}" report "${method_runs[@]}" --out "$RUNS/$dataset-report" >/dev/null
  mkdir -p "$ROOT/experiments/figures"
  for f in tradeoff.png norms.png curves-generalist-d-s0.png; do
    if [ -f "$RUNS/$dataset-report/$f" ]; then
      cp "$RUNS/$dataset-report/$f" "$ROOT/experiments/figures/$dataset-$f"
    fi
  done
}

for stage in $STAGES; do
  case $stage in
  main)  # every method, SEEDS_ALL
    for seed in $SEEDS_ALL; do
      for method in $METHODS; do train_and_eval mnist "$method-s$seed" "$method" "$seed"; done
    done ;;
  key)  # the key comparison with more seeds
    for seed in $SEEDS_KEY; do
      for method in $KEY_METHODS; do train_and_eval mnist "$method-s$seed" "$method" "$seed"; done
    done ;;
  ablation)  # Generalist-D: redistribution policy x c epochs from 0.625·E (the previous rule)
    for policy in per_step_in_epoch once_per_c_epochs; do
      for c in 1 5; do
        train_and_eval mnist "gd-$policy-c$c-s0" generalist-d 0 \
          --set "merge.redistribute.policy=$policy" --set "merge.redistribute.unit=epoch" \
          --set "merge.redistribute.start=$((EPOCHS * 5))/8" --set "merge.redistribute.every=$c"
      done
    done ;;
  cifar)
    for seed in $CIFAR_SEEDS; do
      for method in $CIFAR_METHODS; do
        train_and_eval cifar10 "$method-s$seed" "$method" "$seed"
      done
    done
    for seed in $CIFAR_KEY_SEEDS; do
      for method in $KEY_METHODS; do train_and_eval cifar10 "$method-s$seed" "$method" "$seed"; done
    done ;;
  summary)
    for dataset in mnist cifar10; do
      if [ -n "$(ls "$RUNS/$dataset")" ]; then report "$dataset"; fi
    done ;;
  *) echo "unknown stage $stage (main, key, ablation, cifar, summary)" >&2; exit 2 ;;
  esac
done
