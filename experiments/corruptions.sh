#!/usr/bin/env bash
# Issue 29's claim test: does Generalist's natural learner buy robustness to common corruptions?
# Three methods of the ablation ladder (experiments/ladder.sh) on the CIFAR-10 subset, 3 seeds:
#
#   rung 2  PGD-AT (the preset as shipped)
#   rung 3  PGD-AT with Generalist-D's lr schedule and weight decay (its robust learner alone)
#   rung 5  Generalist-D as shipped (the same robust learner plus the natural one, mixed)
#
# rung 5 against rung 3 isolates the natural learner; rung 5 against rung 2 is the method against
# the baseline. Each model (best on validation, and last) is scored with
# `generalist eval --corruptions generated`: the 15 common corruptions minus frost, made at run
# time from the test images with CIFAR-10-C's severity constants, 5 severities each. These are
# generated corruptions, NOT CIFAR-10-C (other random draws, 70 cells instead of 75): the numbers
# compare these models with each other, never with a RobustBench entry.
#
# Models: the E = 120 ladder's (LADDER_RUNS) when every rung and seed asked for has finished
# there; otherwise fresh EPOCHS-epoch runs (default 20) trained here by experiments/ladder.sh with
# its settings (STAGES=train, so no AutoAttack). The two are never mixed in one table.
#
# Usage (environment variables; finished evaluations are skipped, interrupted ones resumed, so the
# script can be stopped and started again):
#   experiments/corruptions.sh                    # 3 rungs x 3 seeds, best and last models
#   SEEDS=0 MODELS=best experiments/corruptions.sh
#   STAGES=summary experiments/corruptions.sh     # only the table, from RECORDS
#   EPOCHS=1 N=50 SEEDS=0 RUNS=/tmp/c RECORDS=/tmp/c/records experiments/corruptions.sh  # a smoke test
#
# Records: each evaluated run is copied without weights (config, summary, model sidecars and the
# corruption evaluations' eval.json/results.md) to RECORDS, which is committed;
# experiments/corruptions_summary.py builds the table from it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SEEDS=${SEEDS:-0 1 2}
RUNGS=${RUNGS:-2 3 5}
EPOCHS=${EPOCHS:-20}
N=${N:-all}                        # test points: the first N of the split, or all (932)
MODELS=${MODELS:-best last}
JOBS=${JOBS:-2}
STAGES=${STAGES:-train eval summary}
LADDER_RUNS=${LADDER_RUNS:-$ROOT/experiments/runs/ladder-cifar10-e120}
RUNS=${RUNS:-$ROOT/experiments/runs/corruptions-cifar10}
RECORDS=${RECORDS:-$ROOT/experiments/records/corruptions-cifar10}

finished() { ls -d "$1/$2"-2*/summary.json 2>/dev/null | tail -n 1 | xargs -r dirname; }

# Every (rung, seed) in the E = 120 ladder, or none of them from there.
SOURCE=$LADDER_RUNS
for seed in $SEEDS; do for rung in $RUNGS; do
  if [ -z "$(finished "$LADDER_RUNS" "r$rung-s$seed")" ]; then SOURCE=$RUNS; fi
done; done
mkdir -p "$RUNS" "$RECORDS"
if [ "$SOURCE" = "$RUNS" ] && [[ " $STAGES " == *" train "* ]]; then
  echo "$(date -u +%FT%TZ) training rungs $RUNGS, seeds $SEEDS for $EPOCHS epochs into $RUNS"
  DATASET=cifar10 EPOCHS=$EPOCHS RUNGS=$RUNGS SEEDS=$SEEDS JOBS=$JOBS STAGES=train \
    RUNS=$RUNS RECORDS=$RUNS/ladder-protocol PYTHON=$PYTHON "$ROOT/experiments/ladder.sh"
else
  echo "$(date -u +%FT%TZ) models from $SOURCE"
fi

record() {  # record RUN_DIR: its files without weights into RECORDS, whole or not at all
  local dir=$1 file tmp
  tmp="$RECORDS/.tmp-$(basename "$dir")"
  rm -rf "$tmp"
  for file in config.yaml summary.json model.json model-best.json \
    eval-corruptions-best/eval.json eval-corruptions-best/results.md \
    eval-corruptions-last/eval.json eval-corruptions-last/results.md; do
    if [ -f "$dir/$file" ]; then mkdir -p "$(dirname "$tmp/$file")" && cp "$dir/$file" "$tmp/$file"; fi
  done
  rm -rf "$RECORDS/$(basename "$dir")"
  mv "$tmp" "$RECORDS/$(basename "$dir")"
}

evaluate() {  # evaluate RUNG SEED: the generated corruptions on each model, then record
  local name="r$1-s$2" dir which out args
  dir=$(finished "$SOURCE" "$name")
  if [ -z "$dir" ]; then echo "$(date -u +%FT%TZ) $name has not finished in $SOURCE; skipped"; return; fi
  export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
  for which in $MODELS; do
    # A last model byte-identical to the best one would give the same numbers: not run twice.
    if [ "$which" = last ] && cmp -s "$dir/model.safetensors" "$dir/model-best.safetensors"; then
      continue
    fi
    out=$dir/eval-corruptions-$which
    if [ -f "$out/eval.json" ]; then continue; fi
    args=(--model "$which" --corruptions generated --split test --no-progress --threads 1)
    if [ "$N" != all ]; then args+=(--n-examples "$N"); fi
    if [ -f "$out/corruptions-state.json" ]; then args+=(--resume "$out"); else args+=(--out "$out"); fi
    "$PYTHON" -m generalist eval "$dir" "${args[@]}" >>"$RUNS/$name-corruptions.log" 2>&1
  done
  record "$dir"
  echo "$(date -u +%FT%TZ) evaluated $name"
}
export -f evaluate record finished
export PYTHON SOURCE RUNS RECORDS MODELS N

if [[ " $STAGES " == *" eval "* ]]; then
  for seed in $SEEDS; do for rung in $RUNGS; do echo "$rung $seed"; done; done |
    xargs -P "$JOBS" -L 1 bash -c 'evaluate "$0" "$1"'
fi
if [[ " $STAGES " == *" summary "* ]]; then
  "$PYTHON" "$ROOT/experiments/corruptions_summary.py" "$RECORDS" --out "$RUNS/corruptions.md"
fi
