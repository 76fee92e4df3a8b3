# Shared by the device scripts (source it after setting OUT): results go under $OUT/r and are
# packed into $OUT/all.tgz after every step (the device tool returns at most 8 files), so a
# call cut by its time limit still brings back what it finished.
#   pack            re-pack $OUT/r
#   t LIMIT ARGS..  pytest -m gpu ARGS with a time limit, appended to $R/gpu_tests.txt
#   ab_bench WHICH MODEL LIMIT   a replayed-step bench at 512 px of the current sources
#                   (WHICH=cur) or of .cache/WHICH/src (e.g. WHICH=base), to $R/ab_<s>_WHICH_MODEL.txt
#   kt_ab           per-kernel device time of the three cluster-attention kernels in CUDA graphs
#                   (scripts/device/kernel_times.py), current sources and .cache/base/src
#                   alternated (cur base cur base), to $R/kt_{cur,base}_SECONDS.{txt,json}
#   kt_configs LIMIT LIST   single-kernel settings of the current sources (kernel_times.py
#                   --configs LIST, e.g. q:32:168,kv:16:0) with a time limit, to $R/kt_configs.txt
#   kernels_ab      per-kernel device time of the cluster-attention kernels
#                   (scripts/device/attention_kernels.py) of the current sources, then of
#                   .cache/base/src, to $R/attention_kernels_{cur,base}.txt
set -u
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
t() { local lim=$1; shift; echo "== $*" >> "$R/gpu_tests.txt"
  timeout "$lim" python -m pytest -q -m gpu -p no:cacheprovider --tb=short "$@" >> "$R/gpu_tests.txt" 2>&1
  echo "rc=$?" >> "$R/gpu_tests.txt"; pack; }
ab_bench() {
  local P=/tmp/site:$PWD/src; [ "$1" != cur ] && P=/tmp/site:$PWD/.cache/$1/src
  PYTHONPATH=$P timeout "$3" python -u -m affmae.cli bench --models "$2" --resolutions 512 \
    --cuda-graph > "$R/ab_${SECONDS}_$1_$2.txt" 2>&1
  echo "== $1 $2 $SECONDS s"; grep -hE "^$2 " "$R"/ab_*_$1_$2.txt | tail -1; pack
}
kernels_ab() {
  local which P
  for which in cur base; do
    P=/tmp/site:$PWD/src; [ "$which" = base ] && P=/tmp/site:$PWD/.cache/base/src
    PYTHONPATH=$P timeout 120 python -u scripts/device/attention_kernels.py "$R/attention_kernels_$which.txt" \
      > "$R/attention_kernels_$which.log" 2>&1
    echo "== kernels $which rc=$? $SECONDS s"; cut -c1-200 "$R/attention_kernels_$which.txt"; pack
  done
}
kt_ab() {
  local which P f
  for which in cur base cur base; do
    P=/tmp/site:$PWD/src; [ $which = base ] && P=/tmp/site:$PWD/.cache/base/src
    f=$R/kt_${which}_$SECONDS  # this run's files (the grep below reads only them)
    PYTHONPATH=$P timeout 90 python -u scripts/device/kernel_times.py "$f.json" > "$f.txt" 2>&1
    echo "== kt $which rc=$? $SECONDS s"; grep total "$f.txt"; pack
  done
}
kt_configs() {
  PYTHONPATH=/tmp/site:$PWD/src timeout "$1" python -u scripts/device/kernel_times.py "$R/kt_configs.json" \
    --configs "$2" > "$R/kt_configs.txt" 2>&1
  echo "== configs rc=$? $SECONDS s"; grep total "$R/kt_configs.txt"; pack
}
