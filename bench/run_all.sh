#!/usr/bin/env bash
# The benchmarks behind bench/RESULTS.md, with the exact commands.
#
#   bench/run_all.sh [SECTION ...]     sections: models io io-throttled gen gen-throttled gen-3gb baseline
#
# Results (JSON, plus the rendered tables) go to $OUT (default /tmp/layerrun-bench).
# `python -m layerrun.bench ARGS` is the same as `layerrun bench ARGS`.
# Each section is sized to finish in under ~10 minutes on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/layerrun-bench}
SYN3=${SYN3:-/tmp/syn3}
SYN1=${SYN1:-/tmp/syn1}
SYNTINY=${SYNTINY:-/tmp/syntiny}
SMOL=${SMOL:-smollm2-135m-instruct}   # a local-store name; skipped when absent
mkdir -p "$OUT"
BENCH="python -m layerrun.bench"

show() {  # render a saved JSON result as the table the command prints without --json
  python - "$1" <<'EOF'
import json, sys
from layerrun import bench
r = json.load(open(sys.argv[1]))
(bench.print_io_table if r["bench"] == "io" else bench.print_generate_table)(r)
EOF
}

run() {  # run NAME CMD...: JSON to $OUT/NAME.json, the table to $OUT/NAME.txt, the command to $OUT/NAME.cmd
  local name=$1; shift
  echo "+ $*" | tee "$OUT/$name.cmd" >&2
  local t0=$SECONDS
  "$@" --json > "$OUT/$name.json"
  show "$OUT/$name.json" | tee "$OUT/$name.txt"
  echo "($name: $((SECONDS - t0)) s)" >&2
}

have_smol() { python -c "from layerrun.engine.engine import resolve_model_path as r; r('$SMOL')" 2>/dev/null; }

section_models() {
  [ -f "$SYN3/layerrun.json" ] || python tools/synthetic_model.py "$SYN3" --preset 3gb
  [ -f "$SYN1/layerrun.json" ] || python tools/synthetic_model.py "$SYN1" --preset 1gb
  [ -f "$SYNTINY/layerrun.json" ] || python tools/synthetic_model.py "$SYNTINY" --preset tiny
}

section_io() {  # cold (O_DIRECT) and warm read throughput per depth vs dd/fio, 3.4 GB model
  run io_syn3 $BENCH io "$SYN3" --depths 0,1,2,4,8 --passes 2 --rounds 2 --reader direct
}

section_io_throttled() {
  run io_syn1_200MBs $BENCH io "$SYN1" --depths 0,1,2,4,8 --passes 2 --throttle 200MB/s --ref none
}

section_gen() {  # stream (warm page cache) at each depth, and full mode; 0.9 GB model
  run gen_syn1 $BENCH generate "$SYN1" --modes stream,full --depths 0,1,2,4,8 --max-new-tokens 16 --repeat 3
  run gen_syn1_mmap $BENCH generate "$SYN1" --modes stream --depths 0,2 --reader mmap --max-new-tokens 16 --repeat 3
}

section_gen_throttled() {  # stream at 200 MB/s (each step reads 0.73 GB: ~3.7 s)
  run gen_syn1_200MBs $BENCH generate "$SYN1" --modes stream --depths 0,1,2,4 --throttle 200MB/s \
    --max-new-tokens 4 --repeat 3 --warmup 0
}

section_gen_3gb() {  # 3.4 GB model: stream from the page cache and cold (O_DIRECT), full mode
  run gen_syn3 $BENCH generate "$SYN3" --modes stream,full --depths 0,2,4 --max-new-tokens 8 --repeat 3
  run gen_syn3_direct $BENCH generate "$SYN3" --modes stream --depths 0,2,4 --reader direct --max-new-tokens 4 \
    --repeat 3 --warmup 0
}

section_baseline() {  # full mode vs transformers' own generate, same model/dtype/process, alternating runs
  local args=(--max-new-tokens 32 --repeat 7)
  if have_smol; then
    for dt in float32 bfloat16; do
      echo "+ python bench/transformers_baseline.py $SMOL --dtype $dt ${args[*]} --json" | tee "$OUT/tf_smol_$dt.cmd" >&2
      python bench/transformers_baseline.py "$SMOL" --dtype $dt "${args[@]}" --json > "$OUT/tf_smol_$dt.json"
    done
  else
    echo "$SMOL is not in the local store: skipped" >&2
  fi
  for m in syntiny:"$SYNTINY" syn1:"$SYN1" syn3:"$SYN3"; do
    local name=${m%%:*} path=${m#*:} rep=(--max-new-tokens 32 --repeat 7)
    [ "$name" = syn3 ] && rep=(--max-new-tokens 16 --repeat 5)
    echo "+ python bench/transformers_baseline.py $path --dtype float32 ${rep[*]} --json" | tee "$OUT/tf_$name.cmd" >&2
    python bench/transformers_baseline.py "$path" --dtype float32 "${rep[@]}" --json > "$OUT/tf_$name.json"
  done
}

sections=("$@")
[ ${#sections[@]} -eq 0 ] && sections=(models io io-throttled gen gen-throttled gen-3gb baseline)
for s in "${sections[@]}"; do
  "section_${s//-/_}"
done
