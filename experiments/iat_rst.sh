#!/usr/bin/env bash
# The IAT and RST study for RESULTS.md (issue 16), on MNIST:
#   rst: TRADES on LABELED labeled images alone vs RST with the unlabeled rest of the training
#        split (pseudo-labeled by a standard model trained inside each RST run), SEEDS seeds;
#   iat: IAT vs PGD-AT with the same model, data, epochs and attack budget, SEEDS seeds;
# then AutoAttack (standard; Linf 0.3 and L2 2.0) on the first AA_N test points of every run, and the
# tables (experiments/summarize.py: mean ± std over seeds, read from the runs' own files).
#
# Every protocol value is an environment variable below; nothing else needs editing. Finished
# runs and evaluations are skipped and an unfinished run is resumed (`train --resume`: exact,
# the RST labeler included), so the script can be stopped and started again. STAGES picks what
# runs. Wall times go to $RUNS/wall_times.tsv. Not part of CI.
#
# Fair-comparison choices: TRADES and RST share beta, schedule, epochs and the labeled images
# (the rst preset's MNIST values are the trades preset's), so they take the same number of
# steps; an RST step trains on twice the images (half pseudo-labeled). IAT and PGD-AT share the
# optimizer and schedule (the iat preset copies pgd-at's), so they differ only in the loss.
#
# Cost, measured 2026-12-01 on the shared 2-core CPU (load average 4-5, THREADS=1) with
#   RUNS=/tmp/issue16/timing EPOCHS=1 LABELER_EPOCHS=1 SEEDS=0 AA_N=50 experiments/iat_rst.sh
# on this branch before its rebase onto main 4f282cd (the same script, then calling the since
# retired experiments/generalist_cli.py for mnist-bn-cnn, now in the registry):
# (wall s per command, from wall_times.tsv; "epoch" is the loop's train_seconds of its 1 epoch):
#   trades (1,000 labeled):      epoch  9.3 s, train command 24 s, AutoAttack 50 points  15 s
#   rst (1,000 + 58,000 unlab.): epoch 27.1 s, train command 75 s (1-epoch labeler and the
#                                labeling of 58,000 images included), AutoAttack 50 points 67 s
#   pgd-at (6,000):              epoch 37.9 s, train command 66 s, AutoAttack 50 points 102 s
#   iat (6,000):                 epoch 43.3 s, train command 76 s, AutoAttack 50 points 101 s
# AutoAttack's time grows with the points still robust, so 1-epoch models understate it.
# The labeler alone at this protocol (standard, 1,000 labeled, 50 epochs, val_steps 0):
#   generalist train --preset standard --dataset mnist --epochs 50 --set model.name=
#   mnist-bn-cnn --set data.val_size=1000 --set data.train_limit=1000 --set eval.val_steps=0 ...
#   took 148 s and reached 94.8 % clean accuracy on the 1,000 validation images (94.0 % on the
#   first 1,000 test images); the study's summary stage prints how many pseudo-labels agree
#   with the held-back labels.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
GENERALIST=("$PYTHON" -m generalist)  # mnist-bn-cnn is in the model registry (models/cnn.py)
RUNS=${RUNS:-$ROOT/experiments/runs-iat-rst}
MNIST_DIR=${MNIST_DIR:-/work/shared/data/mnist}

MODEL=${MODEL:-mnist-bn-cnn}        # profile: small-cnn (about 4x the cost per image)
EPOCHS=${EPOCHS:-50}                # the MNIST profile's
PGD_STEPS=${PGD_STEPS:-10}          # training PGD steps (profile: 40)
LINF_STEP=${LINF_STEP:-0.04}        # profile: 40 x 0.01; 10 x 0.04 keeps the path length
VAL_SIZE=${VAL_SIZE:-1000}          # validation images carved from the training split
SEEDS=${SEEDS:-0 1 2}
# rst stage
LABELED=${LABELED:-1000}            # labeled training images; the rest of the split is unlabeled
UNLABELED=${UNLABELED:-rest}        # or an .npz holding x_unlabeled, or a folder of images
UNLABELED_FRACTION=${UNLABELED_FRACTION:-0.5}  # Carmon et al.: half of every batch
LABELER_EPOCHS=${LABELER_EPOCHS:-$EPOCHS}      # the standard model that pseudo-labels
# iat stage
IAT_TRAIN_LIMIT=${IAT_TRAIN_LIMIT:-6000}       # as experiments/run_all.sh's MNIST grid; null = all
MIXUP_ALPHA=${MIXUP_ALPHA:-1.0}     # Lamb et al.: Beta(1, 1) for input mixup
# evaluation
TEST_PGD_EXAMPLES=${TEST_PGD_EXAMPLES:-1000}  # the loop's own PGD-20 test (summary.json)
AA_N=${AA_N:-500}                   # AutoAttack test points (first N of the test split)
read -r -a THREATS <<<"${THREATS:---threat Linf:0.3 --threat L2:2.0}"  # summarize.py reads both
THREADS=${THREADS:-1}
STAGES=${STAGES:-rst iat summary}

if [ "$THREADS" != 0 ]; then export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS; fi
mkdir -p "$RUNS/rst" "$RUNS/iat"
TIMES=$RUNS/wall_times.tsv

common=(
  --dataset mnist --data-dir "$MNIST_DIR" --epochs "$EPOCHS"
  --set "model.name=$MODEL" --set "data.val_size=$VAL_SIZE"
  --set "budgets.Linf.steps=$PGD_STEPS" --set "budgets.Linf.step_size=$LINF_STEP"
  --set "eval.test_examples=$TEST_PGD_EXAMPLES"
)

# shellcheck source=experiments/common.sh
source "$ROOT/experiments/common.sh"  # timed, run_dir

train_and_eval() {  # train_and_eval STUDY NAME PRESET SEED [extra --set ...]
  local study=$1 name=$2 preset=$3 seed=$4 dir
  shift 4
  dir=$(run_dir "$study" "$name")
  if [ -z "$dir" ]; then
    timed "train $study/$name" "${GENERALIST[@]}" train --preset "$preset" "${common[@]}" \
      --set "seed=$seed" "$@" --out "$RUNS/$study" --name "$name" --no-progress
    dir=$(run_dir "$study" "$name")
  elif [ ! -f "$dir/summary.json" ]; then
    timed "resume $study/$name" "${GENERALIST[@]}" train --resume "$dir" --no-progress
  fi
  if [ ! -f "$dir/eval-aa/eval.json" ]; then
    rm -rf "$dir/eval-aa"
    timed "autoattack $study/$name" "${GENERALIST[@]}" eval "$dir" --attacks autoattack \
      "${THREATS[@]}" --n-examples "$AA_N" --split test --out "$dir/eval-aa" --no-progress
  fi
}

for stage in $STAGES; do
  case $stage in
  rst)
    for seed in $SEEDS; do
      train_and_eval rst "trades-s$seed" trades "$seed" --set "data.train_limit=$LABELED"
      train_and_eval rst "rst-s$seed" rst "$seed" --set "data.train_limit=$LABELED" \
        --set "data.unlabeled=$UNLABELED" \
        --set "learners.rst.task.unlabeled_fraction=$UNLABELED_FRACTION" \
        --set "pseudo_labels.epochs=$LABELER_EPOCHS"
    done ;;
  iat)
    for seed in $SEEDS; do
      train_and_eval iat "pgd-at-s$seed" pgd-at "$seed" --set "data.train_limit=$IAT_TRAIN_LIMIT"
      train_and_eval iat "iat-s$seed" iat "$seed" --set "data.train_limit=$IAT_TRAIN_LIMIT" \
        --set "learners.iat.task.mixup_alpha=$MIXUP_ALPHA"
    done ;;
  summary)
    for study in rst iat; do
      if [ -n "$(ls "$RUNS/$study")" ]; then
        "$PYTHON" "$ROOT/experiments/summarize.py" "$RUNS/$study" --out "$RUNS/$study-tables.md"
      fi
    done
    for run in "$RUNS"/rst/rst-s*/; do  # how good the pseudo-labels were (held-back labels)
      if [ -f "$run/manifest.json" ]; then
        "$PYTHON" -c 'import json, pathlib, sys; m = pathlib.Path(sys.argv[1])
r = json.loads(m.read_text())["pseudo_labels"]
print(m.parent.name, "labeler val acc %.2f%%" % r["labeler_val_accuracy"],
      "pseudo-label agreement %.2f%%" % r["agreement_with_true_labels"])' "$run/manifest.json"
      fi
    done | tee "$RUNS/rst-pseudo-labels.txt" ;;
  *) echo "unknown stage $stage (rst, iat, summary)" >&2; exit 2 ;;
  esac
done
