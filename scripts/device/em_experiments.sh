#!/usr/bin/env bash
# Issues 5 and 6 on real EM, on ONE GPU, in two calls that chain on a warm machine:
#   phase A: AFFMAE (aff_small) and ViT-MAE (vit_small) pretraining on the unlabelled images of
#            Lucchi++ and ISBI 2012, aff_small without deep supervision on ISBI (issue 6), and
#            aff_small fine-tuned from scratch on both sets (row (a) of issue 5);
#   phase B: fine-tuning from the pretrained checkpoints (rows (b), (c) and the 5/25/100 % label
#            curves), `affmae analyze` of the two ISBI aff_small checkpoints (issue 6);
#   phase C: Lucchi++ (a), (b), (c) at 100 % of the labels again, 1500 fine-tuning steps;
#   phase D: the ViT LLRD check: vit_small pretrained again on Lucchi++ (same recipe), then
#            fine-tuned 1500 steps with layer decay 0.85 and 1.0 (needs no earlier phase).
# All runs of a phase share the GPU as concurrent processes (the eager steps are host-bound, so
# they overlap). Every run is wrapped in `timeout`: pretraining keeps step_XXXXXXX.pt every
# KEEP steps and phase B fine-tunes every model of a set from the largest step ALL of that set's
# pretraining runs reached (equal pretraining steps); fine-tuning evaluates every EVAL steps, and
# the tables use the largest evaluated step all runs of a table reached.
#
# Data: the sets' PNGs copied (losslessly re-encoded) to data/em/{lucchi_pp,isbi2012} and carried.
# The lent GPU image has no kornia: carry its wheels (.whl/: kornia 0.9.0, kornia_rs 0.2.0 for
# cp312) and install them first, as in docs/RESULTS.md section 0:
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# Usage from the repository root:  bash scripts/device/em_experiments.sh A|B|C|D OUT_DIR
# CPU dry run of the plumbing:     SMOKE=1 bash scripts/device/em_experiments.sh A /tmp/o
set -uo pipefail
PHASE=$1
OUT=${2:-${OUT:-outputs}}
mkdir -p "$OUT" runs/logs
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

if [[ ${SMOKE:-0} == 1 ]]; then  # tiny models, CPU, seconds: checks the script, not the method
  AFF=aff_tiny VIT=vit_tiny SIZE=64 DEV=cpu PREC=fp32 PT_STEPS=6 KEEP=3 FT_STEPS=4 EVAL=2
  LONG_STEPS=6 PT_BATCH=4 FT_BATCH=2 T_PT=300 T_FT=${T_FT:-300} WORKERS=0
else
  AFF=aff_small VIT=vit_small SIZE=512 DEV=cuda PREC=bf16 PT_STEPS=${PT_STEPS:-1000} KEEP=200
  FT_STEPS=${FT_STEPS:-400} LONG_STEPS=${LONG_STEPS:-1500} EVAL=100 PT_BATCH=16 FT_BATCH=8
  T_PT=${T_PT:-520} T_FT=${T_FT:-540} WORKERS=2
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
fi
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log -1 --format='affmae commit %h %s' 2>/dev/null || true

# Unlabelled folders: both splits' images of a set (links; the image folder follows them).
mkdir -p runs/unlab/lucchi runs/unlab/isbi
ln -sfn "$PWD/data/em/lucchi_pp/train/images" runs/unlab/lucchi/train
ln -sfn "$PWD/data/em/lucchi_pp/test/images" runs/unlab/lucchi/test
ln -sfn "$PWD/data/em/isbi2012/train/images" runs/unlab/isbi/train
ln -sfn "$PWD/data/em/isbi2012/test/images" runs/unlab/isbi/test
LUCCHI=(--data data/em/lucchi_pp/train --test-data data/em/lucchi_pp/test --class-values 0 255
        --class-names background mitochondrion)
ISBI=(--data data/em/isbi2012/train --val-fraction 0.2 --class-values 0 255
      --class-names membrane cell)

pretrain() {  # NAME MODEL SET [MODEL_OVERRIDES]
  timeout "$T_PT" python -m affmae.cli pretrain --data "runs/unlab/$3" --size $SIZE \
    --crop random_crop --model "$2" --model-overrides "${4:-{\}}" --batch-size $PT_BATCH \
    --grad-accum 1 --steps $PT_STEPS --warmup-steps $((PT_STEPS / 10)) --lr 5e-4 \
    --precision $PREC --device $DEV --num-workers $WORKERS --out "runs/pt/$1" --log-every 10 \
    --ckpt-every $KEEP --keep-every $KEEP \
    --figure-every $((PT_STEPS / 2)) --no-progress >"runs/logs/pt_$1.log" 2>&1
  echo "pretrain $1 rc=$?"
}
finetune() {  # DIR NAME SET FRACTION CHECKPOINT|- STEPS EVAL_EVERY [FLAGS...] ('-': scratch $AFF)
  local dir=$1 name=$2 set=$3 fraction=$4 src=$5 steps=$6 eval_every=$7; shift 7
  local set_args=("${ISBI[@]}") from=(--model $AFF)
  [[ $set == lucchi ]] && set_args=("${LUCCHI[@]}")
  [[ $src != - ]] && from=(--checkpoint "$src")
  timeout "$T_FT" python -m affmae.cli finetune "${set_args[@]}" "${from[@]}" "$@" \
    --label-fraction "$fraction" --size $SIZE --batch-size $FT_BATCH --steps "$steps" \
    --warmup-steps $((steps / 10)) --lr 3e-4 --precision $PREC --device $DEV \
    --num-workers $WORKERS --eval-every "$eval_every" --eval-batch 8 --figure-every "$steps" \
    --ckpt-every "$steps" --out "runs/$dir/$name" --no-progress \
    >"runs/logs/${dir}_$name.log" 2>&1
  echo "finetune $dir/$name rc=$?"
}
short() { finetune ft "$1" "$2" "$3" "$4" $FT_STEPS $EVAL; }  # NAME SET FRACTION SRC
long() { finetune ftlong "$1" lucchi 1.0 "$2" $LONG_STEPS $((LONG_STEPS / 6)) "${@:3}"; }
common_step() {  # RUN... -> largest kept pretraining step every run has
  local best=""
  for s in $(ls "runs/pt/$1" | sed -n 's/^step_0*\([0-9]*\)\.pt$/\1/p' | sort -rn); do
    local ok=1
    for r in "$@"; do [[ -f runs/pt/$r/$(printf 'step_%07d.pt' "$s") ]] || ok=0; done
    if [[ $ok == 1 ]]; then best=$s; break; fi
  done
  echo "$best"
}
ckpt() { printf 'runs/pt/%s/step_%07d.pt' "$1" "$2"; }
case $PHASE in
A)
  rm -rf runs/pt runs/ft
  pretrain aff_lucchi $AFF lucchi &
  pretrain vit_lucchi $VIT lucchi &
  pretrain aff_isbi $AFF isbi &
  pretrain vit_isbi $VIT isbi &
  pretrain aff_isbi_nods $AFF isbi '{aux_weights: [0.0, 0.0]}' &
  short lucchi_a_100 lucchi 1.0 - &
  short isbi_a_100 isbi 1.0 - &
  if [[ $DEV == cuda ]]; then  # the GPU-marked tests (correctness only, so sharing is fine)
    (timeout 480 python -m pytest -q -m gpu -p no:cacheprovider tests >runs/logs/gpu_tests.log 2>&1
     echo "gpu tests rc=$?") &
  fi
  wait
  ;;
B)
  SL=$(common_step aff_lucchi vit_lucchi)
  SI=$(common_step aff_isbi vit_isbi aff_isbi_nods)
  echo "pretraining step used: lucchi $SL, isbi $SI"
  [[ -n $SL && -n $SI ]] || { echo "no common pretraining checkpoint (cold machine?)"; exit 1; }
  for f in 0.05 0.25 1.0; do
    p=$(python -c "print(round($f * 100))")
    short "lucchi_b_$p" lucchi $f "$(ckpt aff_lucchi "$SL")" &
    short "lucchi_c_$p" lucchi $f "$(ckpt vit_lucchi "$SL")" &
    short "isbi_b_$p" isbi $f "$(ckpt aff_isbi "$SI")" &
    short "isbi_c_$p" isbi $f "$(ckpt vit_isbi "$SI")" &
  done
  for r in aff_isbi aff_isbi_nods; do
    python -m affmae.cli analyze --checkpoint "$(ckpt $r "$SI")" --data runs/unlab/isbi \
      --out "runs/analysis/$r" --num-images 16 --device $DEV --precision $PREC \
      >"runs/logs/analyze_$r.log" 2>&1 &
  done
  wait
  ;;
C)
  S=$(common_step aff_lucchi vit_lucchi)
  [[ -n $S ]] || { echo "no common pretraining checkpoint (cold machine?)"; exit 1; }
  long lucchi_a - &
  long lucchi_b "$(ckpt aff_lucchi "$S")" &
  long lucchi_c "$(ckpt vit_lucchi "$S")" &
  wait
  ;;
D)
  T_PT=170 pretrain vit_lucchi $VIT lucchi
  S=$(common_step vit_lucchi)
  for d in 0.85 1.0; do
    long "lucchi_c_ld$d" "$(ckpt vit_lucchi "$S")" --layer-decay $d &
  done
  wait
  ;;
*) echo "phase must be A, B, C or D, got $PHASE"; exit 2 ;;
esac

# What comes back (files of at most 16 MiB each, 8 in all): the text of every run in one archive;
# figures in one archive per kind (PNGs of EM images hardly compress: all of phase B's together
# were over 16 MiB).
tar czf "$OUT/phase${PHASE}_text.tar.gz" runs/logs $(find runs/pt runs/ft runs/ftlong \
  runs/analysis -maxdepth 3 \( -name '*.csv' -o -name '*.json' -o -name '*.yaml' \) 2>/dev/null)
for kind in pt ft ftlong; do
  figs=$(find runs/$kind -path '*/figures/*.png' 2>/dev/null)
  [[ -n $figs ]] && tar cf "$OUT/phase${PHASE}_figures_$kind.tar" $figs
done
for run in runs/analysis/*/; do
  [[ -d $run ]] && tar cf "$OUT/phase${PHASE}_analysis_$(basename "$run").tar" "$run"
done
python scripts/device/em_summary.py runs | tee "$OUT/summary_$PHASE.txt"
