#!/usr/bin/env bash
# Smoke test of a built CPU image: start it twice (the product drafter, and DSPARK_DRAFTER=none: the
# same target without speculation), wait for both to be healthy, send the same greedy chat requests
# to each, require identical answers and drafts accepted in the DSpark server's /metrics, then stop
# and remove both containers (also on failure and on Ctrl-C).
#
#   docker/smoke.sh IMAGE [--port PORT]     (the plain server listens on PORT + 1)
#
# Environment: DSPARK_SMOKE_TIMEOUT (seconds to become healthy, default 900).
set -euo pipefail
IMAGE="${1:?usage: docker/smoke.sh IMAGE [--port PORT]}"
shift
PORT=18080
while [ $# -gt 0 ]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    *) echo "smoke.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TIMEOUT="${DSPARK_SMOKE_TIMEOUT:-900}"
if command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
  ENGINE=podman
  # shellcheck source=docker/podman-env.sh
  . "$REPO/docker/podman-env.sh"
else
  ENGINE=docker
fi
SPEC="dspark-smoke-$$-spec"
PLAIN="dspark-smoke-$$-plain"
log() { echo "[smoke.sh] $*"; }
cleanup() { $ENGINE rm -f "$SPEC" "$PLAIN" >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$(date +%s)
# Host network: the servers listen on PORT / PORT + 1 of 127.0.0.1 (a bridge is not needed, and
# not available everywhere this runs).
$ENGINE run -d --name "$SPEC" --network host --shm-size 1g -e PORT="$PORT" "$IMAGE" >/dev/null
$ENGINE run -d --name "$PLAIN" --network host --shm-size 1g -e PORT=$((PORT + 1)) -e DSPARK_DRAFTER=none "$IMAGE" >/dev/null
log "started $SPEC (:$PORT, DSpark) and $PLAIN (:$((PORT + 1)), no speculation) from $IMAGE"

wait_healthy() {  # name port
  local deadline=$(( $(date +%s) + TIMEOUT ))
  until curl -sf "http://127.0.0.1:$2/health" >/dev/null 2>&1; do
    if [ "$($ENGINE inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" != true ]; then
      log "$1 exited before it was healthy; its log:"; $ENGINE logs "$1" 2>&1 | tail -40; return 1
    fi
    # vLLM's API server can outlive a failed engine start without answering: read its log.
    if $ENGINE logs "$1" 2>&1 | grep -q -E "EngineCore failed to start|Engine core initialization failed"; then
      log "$1: the engine failed to start; its log:"; $ENGINE logs "$1" 2>&1 | grep -v '^\s' | tail -40; return 1
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then
      log "$1 not healthy after ${TIMEOUT}s; its log:"; $ENGINE logs "$1" 2>&1 | tail -40; return 1
    fi
    sleep 3
  done
}
wait_healthy "$SPEC" "$PORT"
wait_healthy "$PLAIN" $((PORT + 1))
log "both healthy after $(( $(date +%s) - start )) s"
if [ "$ENGINE" = podman ]; then  # the image's own HEALTHCHECK agrees
  $ENGINE healthcheck run "$SPEC" >/dev/null && log "HEALTHCHECK of $SPEC: healthy"
fi

python3 - "$PORT" <<'PY'
import json, sys, urllib.request

port = int(sys.argv[1])
prompts = ["What is 12 times 7?", "Write a Python function that reverses a string.",
           "Name three colours of the rainbow.", "Explain what a prime number is in one sentence.",
           "Continue the sequence: 1, 2, 4, 8,"]

def ask(p: int, prompt: str) -> str:
    body = {"model": "smollm2", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 64, "temperature": 0}
    req = urllib.request.Request(f"http://127.0.0.1:{p}/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)["choices"][0]["message"]["content"]

def counters(p: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=30).read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("spec_decode_num_drafts_total", "spec_decode_num_accepted_tokens_total"):
            if line.startswith(f"vllm:{name}"):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out

bad = 0
for prompt in prompts:
    spec, plain = ask(port, prompt), ask(port + 1, prompt)
    same = spec == plain
    bad += not same
    print(f"[smoke.sh] {'identical' if same else 'DIFFERENT'}: {prompt!r} -> {spec[:60]!r}")
    if not same:
        print(f"[smoke.sh]   plain: {plain!r}\n[smoke.sh]   dspark: {spec!r}")
c = counters(port)
print(f"[smoke.sh] DSpark /metrics: {c}")
if bad or c.get("spec_decode_num_drafts_total", 0) <= 0 or c.get("spec_decode_num_accepted_tokens_total", 0) <= 0:
    sys.exit(f"[smoke.sh] FAILED: {bad} answers differ, or no drafts accepted")
PY
log "passed in $(( $(date +%s) - start )) s"
