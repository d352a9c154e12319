#!/usr/bin/env bash
# Does re-running the shipped model's recipe reproduce it (issue #21's acceptance)? The README's training
# command run twice with one seed, side by side on one GPU, each building its own copy of the embedded set
# (run b in a cache folder of its own, with a copy of the word cache's Piper words), then the two exported
# models compared byte for byte and both scored on the held-out engine. Prints a table; writes
# $OUT/audio_rerun.json and $OUT/audio_rerun_a.tar (run a without its checkpoints: what audio.ship needs).
#
#   OUT=/tmp/out bash benchmarks/audio_rerun.sh      # SEED (0), ENGINES, HELDOUT (.heldout/flite)
#
# On the device: carry .whl_audio (the wheels) and .heldout (the Flite set, the Piper word cache). For a CPU
# smoke run: SIZE=tiny ACCEL=cpu EXTRA="--max-steps 4 --model.d_model 16 --val-every 4".
set -euo pipefail
: "${OUT:?set OUT}"
H=${HELDOUT:-.heldout/flite}
SEED=${SEED:-0}
SIZE=${SIZE:-full}
ACCEL=${ACCEL:-gpu}
ENGINES=${ENGINES:-espeak, pico, piper}
RUNS=${RUNS:-/tmp/kws_rerun}
read -r -a extra <<< "${EXTRA:-}"
py=${PYTHON:-python3}
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
export LONG_SSM_CACHE=${LONG_SSM_CACHE:-$PWD/.heldout/cache}
[ -f "$H/testing_list.txt" ] || { echo "audio_rerun: $H: no held-out set (python -m audio.heldout --output-dir $H)"; exit 2; }
rm -rf "$RUNS"
mkdir -p "$RUNS/cache_b" "$OUT"
[ ! -d "$LONG_SSM_CACHE/audio/words-v3" ] || cp -r "$LONG_SSM_CACHE/audio/words-v3" "$RUNS/cache_b/words-v3"
start=$(date +%s)

train() { local name=$1; shift
  $py -m audio.train --config configs/audio/kws_synth.yaml --synth-engines "[$ENGINES]" --seed "$SEED" \
    --synth-size "$SIZE" --accelerator "$ACCEL" --num-workers 2 --heldout "[$H]" --output-dir "$RUNS/$name" \
    "${extra[@]}" "$@" > "$RUNS/$name.log" 2>&1; }
train a &
train b --synth-cache "$RUNS/cache_b" &
wait || true
echo "[$(( $(date +%s) - start )) s] both runs done"
for r in a b; do tr '\r' '\n' < "$RUNS/$r.log" | grep -a "audio.train: accuracy\|rror" | sed "s/^/$r: /" || true; done

$py - "$RUNS" "$OUT/audio_rerun.json" "$SEED" <<'PY'
import json, sys
from pathlib import Path
runs, out, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
res = {"seed": seed, "runs": {}}
for r in ("a", "b"):
    m = runs / r / "metrics.json"
    if m.is_file():
        d = json.loads(m.read_text())
        res["runs"][r] = {"validation": d["validation"]["accuracy"], **d.get("accuracy_by_engine", {})}
models = [runs / r / "model" / "model.safetensors" for r in ("a", "b")]
res["identical_models"] = all(p.is_file() for p in models) and models[0].read_bytes() == models[1].read_bytes()
sets = [json.loads((runs / r / "metrics.json").read_text())["data"] for r in ("a", "b")
        if (runs / r / "metrics.json").is_file()]
if len(sets) == 2:   # the two copies of the embedded set, file by file
    a, b = (Path(s) for s in sets)
    files = sorted(p.relative_to(a) for p in a.rglob("*.wav"))
    res["set_files"] = len(files)
    res["set_files_differing"] = sum((a / f).read_bytes() != (b / f).read_bytes() for f in files)
out.write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
PY
tar -C "$RUNS" --exclude='a/checkpoints' -cf "$OUT/audio_rerun_a.tar" a
