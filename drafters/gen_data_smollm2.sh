#!/usr/bin/env bash
# Generate the SmolLM2-135M-Instruct training data (#18): the target's own answers, training files
# and target-written requests only (never an evaluation set). Resumable: every step appends and
# skips what is already written, so rerun it after an interruption.
#
#   drafters/gen_data_smollm2.sh            # ~5,600 greedy + ~1,500 T=1 answers
#   SELF=300 GREEDY=600 SAMPLED=100 drafters/gen_data_smollm2.sh   # a small run
#
# Outputs (git-ignored): work_cache/data/self_prompts.jsonl (requests the target wrote),
# work_cache/train_data.jsonl (greedy answers), work_cache/train_data_t1.jsonl (T=1 answers).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TARGET=${TARGET:-work_cache/smollm2-135m}
SHARED=${SHARED:-../shared/data}
SELF=${SELF:-3000}          # target-written requests (chat, code, math, reasoning)
GREEDY=${GREEDY:-5600}      # greedy answers: self-written, self-instruct seeds and GSM8K train, round-robin
SAMPLED=${SAMPLED:-1500}    # T=1 answers: self-written and GSM8K train
mkdir -p work_cache/data
GEN=("$PY" -m dspark_plugin.vllm.gen_data --target "$TARGET")
log() { echo "$(date -u +%FT%TZ) $*"; }

# The committed archive of an earlier run (drafters/data_archive.py) first: what it holds is not
# generated again. Then the 800 greedy answers of the first sessions, the same format.
[ -f drafters/data/smollm2-135m-train-data.tar.xz ] && "$PY" drafters/data_archive.py unpack
[ -s work_cache/train_data.jsonl ] || cp drafters/data/smollm2-135m-greedy-responses.jsonl work_cache/train_data.jsonl

log "self-written requests -> work_cache/data/self_prompts.jsonl"
"${GEN[@]}" --prompts none --out work_cache/data/self_prompts.jsonl --write-prompts "$SELF" --chunk 256
log "greedy answers -> work_cache/train_data.jsonl"
"${GEN[@]}" --prompts "$SHARED/self_instruct_seed.jsonl" "$SHARED/gsm8k_train.jsonl" work_cache/data/self_prompts.jsonl \
  --out work_cache/train_data.jsonl --limit "$GREEDY" --max-new-tokens 256 --chunk 256
log "T=1 answers -> work_cache/train_data_t1.jsonl"
"${GEN[@]}" --prompts work_cache/data/self_prompts.jsonl "$SHARED/gsm8k_train.jsonl" \
  --out work_cache/train_data_t1.jsonl --limit "$SAMPLED" --temperature 1.0 --max-new-tokens 256 --chunk 256 --seed 1
log "done: $(wc -l < work_cache/train_data.jsonl) greedy, $(wc -l < work_cache/train_data_t1.jsonl) sampled"
log "to keep them across machines: $PY drafters/data_archive.py pack, then commit the archive"
