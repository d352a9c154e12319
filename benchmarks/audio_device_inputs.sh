#!/usr/bin/env bash
# What the audio GPU commands (audio_generalisation.sh, audio_rerun.sh) carry to a machine that has neither
# network nor these packages, made on a development machine that has both. About 7 minutes on 2 cores.
#
#   bash benchmarks/audio_device_inputs.sh       # then carry .whl_audio and .heldout (about 52 MB together)
#
#   .whl_audio/   the wheels the GPU image lacks, at the lock's versions, for Python 3.12 (install there with
#                 pip install --no-index --no-deps --target /tmp/site .whl_audio/*.whl)
#   .heldout/flite               the held-out engine's test set (audio.heldout; needs Debian's flite here)
#   .heldout/cache/audio/words-v3/piper~*   the Piper words of the full set (seeded, so the same on any
#                 machine that makes them: docs/audio.md, "Piper seeded"), made with the `voices` extra
# Both folders are ignored by git (.whl_audio through .git/info/exclude, which this script extends).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
lock=requirements/lock-py312-linux-x86_64.txt
grep -qx '/.whl_audio/' .git/info/exclude 2>/dev/null || echo '/.whl_audio/' >> .git/info/exclude

# 1. wheels: the lock's pins of the packages the GPU image does not have
pins=()
for name in cffi espeakng-loader jsonargparse py-nanotts pycparser pyfaidx soundfile; do
  pins+=("$(grep -oiE "^$name==[^ ]+" "$lock")") || { echo "audio_device_inputs: $name is not in $lock"; exit 2; }
done
platforms=()
for p in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 \
    manylinux1; do platforms+=(--platform "${p}_x86_64"); done
$py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" --platform any -d .whl_audio "${pins[@]}"

# 2. the held-out engine's set
command -v flite > /dev/null || { echo "audio_device_inputs: no flite here (apt-get install flite)"; exit 2; }
[ -f .heldout/flite/testing_list.txt ] || $py -m audio.heldout --output-dir .heldout/flite

# 3. the full set's Piper words, in the word cache the GPU commands read (LONG_SSM_CACHE=.heldout/cache);
#    through -c, not stdin: the synthesis pool's spawned workers re-read a main script, which stdin is not
words_py=$(cat <<'PY'
from audio.engines import piper_available
from audio.synth import PIPER_TRAIN_VOICES, SynthConfig, speak_all

if not piper_available():
    raise SystemExit("audio_device_inputs: the Piper voice needs the `voices` extra: pip install '.[voices]'")
words = SynthConfig().utterances(PIPER_TRAIN_VOICES)
for i, _ in enumerate(speak_all(words, ".heldout/cache/audio"), 1):
    if i % 243 == 0 or i == len(words):
        print(f"audio_device_inputs: {i} / {len(words)} Piper words", flush=True)
PY
)
$py -c "$words_py"
du -sh .whl_audio .heldout
