#!/usr/bin/env bash
# How the drafters shipped until 2026-12-06 were trained (block 7, lockstep rounds, full vocabulary).
# Superseded by drafters/train_smollm2.sh (5x faster trainer recipe, 10x the data); kept so that
# those drafters stay reproducible until they are replaced.
#
# A background builder keeps extending the shared activation cache while `gen-data` is still
# writing responses. Each round snapshots the cached prefix of the data file, then advances the
# drafters by ROUND steps in parallel on exactly that snapshot, so they share data and
# steps. Resumable: rerun the script and every drafter continues from its trainer_state/.
#
#   TOTAL=250 ROUND=125 drafters/train_smollm2_lockstep.sh
#   ONLY="smollm2-135m-native-dflash-b7" drafters/train_smollm2_lockstep.sh   # just these (space-separated)
#
# Outputs (git-ignored): work_cache/drafter_runs/<name>/ ; `drafters/publish.py` copies them to
# drafters/<name>/{config.json,model.safetensors,README.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
DSPARK=${DSPARK:-.venv/bin/dspark}
PY=${PY:-.venv/bin/python}
TARGET=${TARGET:-work_cache/smollm2-135m}
DATA=${DATA:-work_cache/train_data.jsonl}
CACHE=${CACHE:-work_cache/act_cache_smollm2}
RUNS=${RUNS:-work_cache/drafter_runs}
TOTAL=${TOTAL:-250}
ROUND=${ROUND:-125}
THREADS=${THREADS:-1}
LR=${LR:-3e-3}
mkdir -p "$RUNS"
SNAP="$RUNS/data_snapshot.jsonl"
COMMON=(--target "$TARGET" --cache "$CACHE" --threads "$THREADS" --no-progress
        --layers 1 --num-taps 5 --block-size 7 --steps "$TOTAL" --lr "$LR"
        --batch-size 2 --anchors-per-seq 16 --seed 0 --save-dtype bfloat16)
# native-dflash: vLLM's own dflash drafter (`--layout dflash`): the same 7-slot block forward, but
# bonus token + 6 masks, so 6 drafts per step (served with num_speculative_tokens 6).
NAMES=(smollm2-135m-dspark-vanilla-b7 smollm2-135m-dspark-rnn-b7 smollm2-135m-dflash-b7
       smollm2-135m-native-dflash-b7)
declare -A HEAD=( [smollm2-135m-dspark-vanilla-b7]="--head vanilla --markov-rank 64"
                  [smollm2-135m-dspark-rnn-b7]="--head rnn --markov-rank 64"
                  [smollm2-135m-dflash-b7]="--head none"
                  [smollm2-135m-native-dflash-b7]="--head none --layout dflash" )
if [ -n "${ONLY:-}" ]; then read -r -a NAMES <<< "$ONLY"; fi

cached_prefix() {  # number of leading data lines whose features are in the cache
  "$PY" - "$CACHE" <<'EOF'
import re, sys
from pathlib import Path
spans = sorted(tuple(map(int, re.findall(r"\d+", p.stem))) for p in Path(sys.argv[1]).glob("lines_*.safetensors"))
n = 0
for a, b in spans:
    if a <= n:
        n = max(n, b + 1)
print(n)
EOF
}

build_cache() {
  while true; do
    if [ ! -f "$CACHE/manifest.json" ] || [ "$(wc -l < "$DATA")" -gt "$(cached_prefix)" ]; then
      "$DSPARK" train "${COMMON[@]}" --data "$DATA" --out "$RUNS/_cache_builder" --cache-only \
        >> "$RUNS/_cache_builder.log" 2>&1 || true
    fi
    sleep 30
  done
}
build_cache &
BUILDER=$!
trap 'kill $BUILDER 2>/dev/null || true' EXIT

until [ -f "$CACHE/manifest.json" ] && [ "$(cached_prefix)" -ge 64 ]; do sleep 20; done
for ((upto = ROUND; upto < TOTAL + ROUND; upto += ROUND)); do
  (( upto > TOTAL )) && upto=$TOTAL
  n=$(cached_prefix)
  head -n "$n" "$DATA" > "$SNAP"
  echo "$(date -u +%FT%TZ) round up to step $upto on the first $n sequences"
  for name in "${NAMES[@]}"; do
    # shellcheck disable=SC2086
    "$DSPARK" train "${COMMON[@]}" ${HEAD[$name]} --data "$SNAP" --out "$RUNS/$name" --resume \
      --no-extend-cache --stop-after "$upto" --save-every "$ROUND" > "$RUNS/$name.log" 2>&1 &
  done
  wait $(jobs -p | grep -v "^$BUILDER$")
  for name in "${NAMES[@]}"; do echo "$name: $(tail -n 1 "$RUNS/$name/train_log.jsonl")"; done
done
echo "$(date -u +%FT%TZ) done"
