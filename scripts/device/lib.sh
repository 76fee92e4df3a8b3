# Shared by the device scripts (source it after setting OUT): results go under $OUT/r and are
# packed into $OUT/all.tgz after every step (the device tool returns at most 8 files), so a
# call cut by its time limit still brings back what it finished.
#   pack            re-pack $OUT/r
#   t LIMIT ARGS..  pytest -m gpu ARGS with a time limit, appended to $R/gpu_tests.txt
set -u
R=$OUT/r
mkdir -p "$R"
pack() { tar czf "$OUT/all.tgz" -C "$OUT" r; }
t() { local lim=$1; shift; echo "== $*" >> "$R/gpu_tests.txt"
  timeout "$lim" python -m pytest -q -m gpu -p no:cacheprovider --tb=short "$@" >> "$R/gpu_tests.txt" 2>&1
  echo "rc=$?" >> "$R/gpu_tests.txt"; pack; }
