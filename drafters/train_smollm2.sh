#!/usr/bin/env bash
# Train the shipped SmolLM2-135M-Instruct drafters (block 7) from scratch: data, activation cache,
# then each drafter at one common budget (the same data, epochs, batch and draft vocabulary).
#
#   drafters/train_smollm2.sh                       # everything (hours on 2 CPU cores)
#   ONLY="smollm2-135m-dspark-vanilla-b7-v8k" EPOCHS=2 drafters/train_smollm2.sh
#
# Resumable at every stage: the data generation skips what is written, the cache builds only
# missing sequences, each drafter continues from its trainer_state/. Outputs (git-ignored):
# work_cache/train_mix.jsonl, work_cache/act_cache_smollm2/, work_cache/drafter_runs/<name>/;
# `drafters/publish.py` copies a run to drafters/<name>/ with its model card.
set -euo pipefail
cd "$(dirname "$0")/.."
DSPARK=${DSPARK:-.venv/bin/dspark}
TARGET=${TARGET:-work_cache/smollm2-135m}
DATA=${DATA:-work_cache/train_mix.jsonl}
CACHE=${CACHE:-work_cache/act_cache_smollm2}
RUNS=${RUNS:-work_cache/drafter_runs}
EPOCHS=${EPOCHS:-1}
VOCAB=${VOCAB:-8192}
THREADS=${THREADS:-2}
# The cache build's matrix products in bf16 where the CPU has AVX-512 bf16 (~2x faster; the residual
# stream and norms stay fp32, dspark_plugin/train/cache.py says what it changes); fp32 elsewhere.
CACHE_MATMUL=${CACHE_MATMUL:-$(grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null && echo bfloat16 || echo float32)}
mkdir -p "$RUNS"
log() { echo "$(date -u +%FT%TZ) $*"; }

# 1. Data: the target's own greedy and T=1 answers (drafters/gen_data_smollm2.sh), concatenated once.
# The line number is the activation cache's key, so the mix is only ever appended to.
if [ ! -s "$DATA" ]; then
  drafters/gen_data_smollm2.sh
  cat work_cache/train_data.jsonl work_cache/train_data_t1.jsonl > "$DATA.tmp" && mv "$DATA.tmp" "$DATA"
fi

# 2. Activation cache (taps, final states, log-partition): one target pass for every drafter.
# The recipe (benchmarks/train_throughput.py, `fast`): the pruned draft vocabulary from the first
# step, 4 sequences x 32 anchor blocks a step, both cores.
COMMON=(--target "$TARGET" --data "$DATA" --cache "$CACHE" --threads "$THREADS" --no-progress
        --layers 1 --num-taps 5 --block-size 7 --epochs "$EPOCHS" --lr 3e-3 --batch-size 4
        --anchors-per-seq 32 --seed 0 --save-dtype bfloat16 --save-every 200 --cache-matmul "$CACHE_MATMUL")
log "activation cache -> $CACHE"
"$DSPARK" train "${COMMON[@]}" --out "$RUNS/_cache_builder" --cache-only > "$RUNS/_cache_builder.log" 2>&1

# 3. The drafters, one after the other (each uses both cores).
NAMES=(smollm2-135m-dspark-vanilla-b7-v8k smollm2-135m-dflash-b7-v8k smollm2-135m-dspark-rnn-b7-v8k
       smollm2-135m-dspark-gated-b7-v8k smollm2-135m-native-dflash-b7)
declare -A HEAD=( [smollm2-135m-dspark-vanilla-b7-v8k]="--head vanilla --markov-rank 64 --draft-vocab $VOCAB"
                  [smollm2-135m-dflash-b7-v8k]="--head none --draft-vocab $VOCAB"
                  [smollm2-135m-dspark-rnn-b7-v8k]="--head rnn --markov-rank 64 --draft-vocab $VOCAB"
                  [smollm2-135m-dspark-gated-b7-v8k]="--head gated --markov-rank 64 --draft-vocab $VOCAB"
                  # vLLM's own dflash format scores the full vocabulary (no d2t in its reader).
                  [smollm2-135m-native-dflash-b7]="--head none --layout dflash" )
if [ -n "${ONLY:-}" ]; then read -r -a NAMES <<< "$ONLY"; fi
for name in "${NAMES[@]}"; do
  log "train $name"
  # shellcheck disable=SC2086
  "$DSPARK" train "${COMMON[@]}" --no-extend-cache ${HEAD[$name]} --out "$RUNS/$name" --resume \
    > "$RUNS/$name.log" 2>&1
  log "$name: $(tail -n 1 "$RUNS/$name/train_log.jsonl")"
done
