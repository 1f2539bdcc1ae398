#!/usr/bin/env bash
# Train the three shipped SmolLM2-135M-Instruct drafters (block 7) in lockstep rounds:
# each round first extends the shared activation cache with whatever `dspark gen-data` has
# written so far, then advances every drafter by ROUND steps on exactly the same cached data.
# Resumable: rerun the script and every drafter continues from its trainer_state/.
#
#   TOTAL=200 ROUND=50 drafters/train_smollm2.sh
#
# Outputs (git-ignored): work_cache/drafter_runs/<name>/ ; the shipped copies are
# drafters/<name>/{config.json,model.safetensors,README.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
DSPARK=${DSPARK:-.venv/bin/dspark}
TARGET=${TARGET:-work_cache/smollm2-135m}
DATA=${DATA:-work_cache/train_data.jsonl}
CACHE=${CACHE:-work_cache/act_cache_smollm2}
RUNS=${RUNS:-work_cache/drafter_runs}
TOTAL=${TOTAL:-200}
ROUND=${ROUND:-50}
THREADS=${THREADS:-1}
COMMON=(--target "$TARGET" --data "$DATA" --cache "$CACHE" --threads "$THREADS" --no-progress
        --layers 1 --num-taps 5 --block-size 7 --steps "$TOTAL" --lr 6e-4
        --batch-size 4 --anchors-per-seq 16 --seed 0 --save-dtype bfloat16)

declare -A HEAD=( [smollm2-135m-dspark-vanilla-b7]="--head vanilla --markov-rank 64"
                  [smollm2-135m-dspark-rnn-b7]="--head rnn --markov-rank 64"
                  [smollm2-135m-dflash-b7]="--head none" )

for ((upto = ROUND; upto < TOTAL + ROUND; upto += ROUND)); do
  (( upto > TOTAL )) && upto=$TOTAL
  echo "$(date -u +%FT%TZ) round up to step $upto: extending cache"
  "$DSPARK" train "${COMMON[@]}" --out "$RUNS/_cache_builder" --cache-only
  for name in smollm2-135m-dspark-vanilla-b7 smollm2-135m-dspark-rnn-b7 smollm2-135m-dflash-b7; do
    echo "$(date -u +%FT%TZ) $name -> step $upto"
    # shellcheck disable=SC2086
    "$DSPARK" train "${COMMON[@]}" ${HEAD[$name]} --out "$RUNS/$name" --resume --no-extend-cache \
      --stop-after "$upto" --save-every "$ROUND"
    tail -n 1 "$RUNS/$name/train_log.jsonl"
  done
done
echo "$(date -u +%FT%TZ) done"
