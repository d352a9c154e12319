#!/usr/bin/env bash
# The GPU runs of docs/seeds.md in device commands of under 9 minutes each, resumable across commands.
#
#   bash benchmarks/seeds_gpu.sh 1     # oracle step, copying at 256 (+ induction heads beside it), copying at 4096
#   bash benchmarks/seeds_gpu.sh 2     # whatever command 1 left unfinished, then the DNA context sweep
#   bash benchmarks/seeds_gpu.sh dna   # the DNA context sweep alone
#
# State between commands: each experiment's folder (run folders with their checkpoints, JSON, PNGs) is packed
# into $OUT/<experiment>.tar (copy256, copy4096, induction, dna_regional; each under 16 MB); put those files in
# runs/seeds/ of the checkout (carried to the device) before the next command, which unpacks them and
# continues: finished runs are kept as they are, unfinished ones resume. All logs end up in $OUT/seeds.log.
# SEEDS_EXTRA (flags appended to every grid) and SEEDS_TIME_SCALE are for a CPU check of the path only.
set -u
PART=${1:-1}
OUT=${OUT:?set OUT to the folder that comes back}
S=${SEEDS_WORK:-/tmp/seeds-work}
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$S"
# A folder already in $S (a warm machine's earlier command) is newer than the tar it came from: keep it.
for f in runs/seeds/*.tar; do [ -f "$f" ] && [ ! -d "$S/$(basename "$f" .tar)" ] && tar xf "$f" -C "$S"; done
X=${SEEDS_EXTRA:-}
T=${SEEDS_TIME_SCALE:-1}   # seconds per second of the budget below (tiny for a CPU check)
t() { awk "BEGIN{print int($1 * $T) + 1}"; }
# Seconds this script may take in all (a device command has 9 minutes, including the wheel install before
# it): a later step gets what is left, up to its own limit, and is skipped when under a minute is left.
BUDGET=${SEEDS_BUDGET:-500}
left() { awk "BEGIN{l = int($BUDGET * $T) - $SECONDS; c = int($1 * $T) + 1; print (l < c ? l : c)}"; }
m() { awk "BEGIN{print $1 * $T}"; }
# timeout signals its whole process group, so a grid's worker processes stop with it.
grid() { local secs=$1; shift; timeout "$secs" $PY -m benchmarks.mixer_tasks "$@" $X; }
finished() { $PY -c "import json,sys; d = json.load(open('$1/mixer_tasks.json')); sys.exit(bool(d['unfinished'] or d.get('failed')))" 2>/dev/null; }

# Minutes of training for a grid granted $1 seconds, keeping $2 seconds (scaled) for start-up and evaluation.
tl() { awk "BEGIN{print ($1 - $2 * $T) / 60}"; }

# The three grids, each granted $1 seconds (its log in $S).
copy256() { grid "$1" --config configs/seeds/selective_copy_256.yaml --out-dir "$S/copy256" \
    --time-limit "$(tl "$1" 48)" > "$S/copy256.log" 2>&1; }
induction() { grid "$1" --config configs/seeds/induction.yaml --out-dir "$S/induction" \
    --time-limit "$(tl "$1" 100)" > "$S/induction.log" 2>&1; }
# SEEDS_COPY4096_STEPS: a longer stage two than the config's 1,200 steps; runs finished at fewer steps continue
# from their checkpoints (benchmarks.mixer_tasks), over as many commands as it takes.
copy4096() { grid "$1" --config configs/seeds/selective_copy_4096.yaml --init-from-grid "$S/copy256" \
    --out-dir "$S/copy4096" --time-limit "$(tl "$1" 40)" ${SEEDS_COPY4096_STEPS:+--steps "$SEEDS_COPY4096_STEPS"} \
    > "$S/copy4096.log" 2>&1; }

copy_and_induction() {
  # Grids share the GPU (small models: each process is CPU-bound, 16 cores).
  local a b
  if finished "$S/copy256"; then
    # Stage one is done (an earlier command): stage two at 4096 and the induction grid share the GPU and
    # the whole budget but the DNA sweep's share.
    a=$(left 480)
    if [ "$a" -lt "$(t 60)" ]; then return; fi
    induction "$a" & copy4096 "$a" &
    wait
    return
  fi
  a=$(left 240)
  if [ "$a" -lt "$(t 60)" ]; then return; fi
  copy256 "$a" & induction "$a" &
  wait
  b=$(left 190)
  if finished "$S/copy256" && [ "$b" -ge "$(t 60)" ]; then
    copy4096 "$b"
  fi
}

# The DNA context sweep on the regional genome (docs/seeds.md section 4b), granted $1 seconds, with the model
# whose state could hold a region's counts in the CPU pilot (expand 2, d_state 16: 138k parameters; the
# demo model's table came from the same command without the two --model flags). (The table of the copies
# genome came from `--genome copies --steps 300 --seq-len-warmup 0` into dna/.)
dna() { timeout "$1" $PY -m benchmarks.dna_context --device ${SEEDS_DNA_DEVICE:-gpu} --genome regional \
    --model.expand 2 --model.d_state 16 --out-dir "$S/dna_regional" --contexts 1024 4096 16384 65536 131072 \
    --steps 1000 ${SEEDS_DNA_EXTRA:-} > "$S/dna_context.log" 2>&1; }

if [ "$PART" = 1 ]; then
  if [ -f .bench/mamba_reference.py ]; then
    timeout "$(t 40)" $PY -m benchmarks.mamba_ssm_step --device cuda --seq-len 4096 --anchor-dir .bench \
        --out "$OUT/mamba_ssm_step.json" > "$S/mamba_ssm_step.log" 2>&1
  fi
  copy_and_induction
elif [ "$PART" = dna ]; then
  dna "$(left 600)"
else
  copy_and_induction
  if [ "$(left 200)" -ge "$(t 60)" ]; then dna "$(left 200)"; fi
fi
for f in mamba_ssm_step copy256 induction copy4096 dna_context; do
  [ -f "$S/$f.log" ] && { echo "=== $f"; cat "$S/$f.log"; } >> "$OUT/seeds.log"
done
for d in copy256 copy4096 induction; do
  [ -d "$S/$d" ] && (cd "$S" && tar cf "$OUT/$d.tar" --exclude='*.tmp' "$d")
done
# The DNA runs' Lightning checkpoints would pass 16 MB; a context without metrics.json is simply run again.
# Every sweep folder (dna_regional, and those SEEDS_DNA_EXTRA's --out-dir named beside it).
for d in "$S"/dna_regional*/; do
  d=$(basename "$d"); [ -d "$S/$d" ] && (cd "$S" && tar cf "$OUT/$d.tar" --exclude='*.tmp' --exclude='*.ckpt' "$d")
done
ls -la "$OUT"
