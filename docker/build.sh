#!/usr/bin/env bash
# Build a DSpark image with podman or docker, whichever runs here; the last line printed is the
# image's tag.
#
#   docker/build.sh cpu|cuda [--offline-base] [--tag TAG]
#
# --offline-base  the Dockerfile's base image cannot be pulled (no registry): make a stand-in from
#                 debootstrap (Debian bookworm + python3; CPU image only) and tag it as the base.
#
# The build context is staged, not the checkout: docker/install.sh and serve-cpu.sh, the plugin's
# wheel (built from this checkout) and the product drafter. Layers: base -> apt -> engine (torch,
# vLLM; rebuilt only when install.sh changes) -> plugin + drafter + target (rebuilt per commit).
# With podman, pip inside the build sees the host's pip configuration, the local indexes and
# folders it names and the CA bundle (read-only bind mounts for the build only: nothing of them is
# in the image), so it works behind a proxy with its own CA as on an open network. Docker's builder
# cannot mount at build time: it gets the proxy variables only.
#
# Environment: DSPARK_IMAGE_CACHE (debootstrap root, default /var/tmp/dspark-images),
# PYTHON (builds the wheel, default python3).
set -euo pipefail

MODE="${1:?usage: docker/build.sh cpu|cuda [--offline-base] [--tag TAG]}"
shift
OFFLINE_BASE=0
TAG=""
while [ $# -gt 0 ]; do
  case "$1" in
    --offline-base) OFFLINE_BASE=1; shift ;;
    --tag) TAG="$2"; shift 2 ;;
    *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$MODE" in cpu|cuda) ;; *) echo "build.sh: mode must be cpu or cuda, got $MODE" >&2; exit 2 ;; esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DOCKERFILE="$REPO/docker/Dockerfile.$MODE"
TAG="${TAG:-localhost/dspark-vllm-$MODE:$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo dev)}"
BASE="$(awk '$1 == "FROM" {print $2; exit}' "$DOCKERFILE")"
CACHE="${DSPARK_IMAGE_CACHE:-/var/tmp/dspark-images}"
log() { echo "[build.sh $MODE] $*" >&2; }

if command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then
  ENGINE=podman
  # shellcheck source=docker/podman-env.sh
  . "$REPO/docker/podman-env.sh"
elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  ENGINE=docker
else
  echo "build.sh: neither podman nor docker can build here (install podman: apt-get install -y podman runc)" >&2
  exit 2
fi
log "engine: $ENGINE; base: $BASE; tag: $TAG"

# -- the base image --------------------------------------------------------------------------
apt_mirror() {  # the Debian mirror this machine's apt uses (deb822 or one-line sources)
  local uri
  uri=$(grep -h -m1 -E '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | head -n1 || true)
  [ -n "$uri" ] || uri=$(grep -h -m1 -E '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}
if ! $ENGINE image inspect "$BASE" >/dev/null 2>&1; then
  if [ "$OFFLINE_BASE" = 0 ]; then
    log "pulling $BASE"
    $ENGINE pull "$BASE" || { echo "build.sh: cannot pull $BASE; --offline-base makes a stand-in" >&2; exit 1; }
  elif [ "$MODE" != cpu ]; then
    echo "build.sh: --offline-base makes a Debian stand-in for the CPU image only; $BASE must be pulled" >&2
    exit 2
  else
    command -v debootstrap >/dev/null || { echo "build.sh: --offline-base needs debootstrap (apt-get install -y debootstrap)" >&2; exit 2; }
    # What the official python image has that torch.compile needs: the interpreter's headers.
    ROOTFS="$CACHE/bookworm-python3-dev"
    if [ ! -f "$ROOTFS/usr/include/python3.11/Python.h" ]; then
      log "debootstrap bookworm (python3 with headers, venv, CA certificates) from $(apt_mirror) into $ROOTFS"
      rm -rf "$ROOTFS" && mkdir -p "$CACHE"
      debootstrap --variant=minbase --include=python3,python3-dev,python3-venv,ca-certificates bookworm \
        "$ROOTFS" "$(apt_mirror)" >&2
    fi
    log "importing $ROOTFS as $BASE (a stand-in: Debian bookworm's python3 3.11 for the official image)"
    tar -C "$ROOTFS" -c . | $ENGINE import --change "LABEL org.dspark.stand-in=debootstrap" - "$BASE" >&2
  fi
fi

# -- the build context: staged ---------------------------------------------------------------
CTX="$(mktemp -d "${TMPDIR:-/tmp}/dspark-image-ctx.XXXXXX")"
trap 'rm -rf "$CTX"' EXIT
mkdir -p "$CTX/docker" "$CTX/dist" "$CTX/drafters"
cp "$REPO/docker/install.sh" "$REPO/docker/serve-cpu.sh" "$CTX/docker/"
log "building the plugin's wheel"
(cd "$REPO" && "${PYTHON:-python3}" -m pip wheel -q --no-deps -w "$CTX/dist" .) >&2
cp -r "$REPO/drafters/smollm2-135m-dspark-vanilla-b7-v8k" "$CTX/drafters/"

ARGS=(build --network host -f "$DOCKERFILE" -t "$TAG")
for v in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
  if [ -n "${!v:-}" ]; then ARGS+=(--build-arg "$v=${!v}"); fi
done
if [ "$ENGINE" = podman ]; then
  ARGS+=(--pull=never --format docker)   # docker format: keeps the HEALTHCHECK
  declare -A MOUNTED=()
  mount_ro() {  # host path -> same path in the build, once each
    local src="$1" dst="${2:-$1}"
    if [ -e "$src" ] && [ -z "${MOUNTED[$dst]:-}" ]; then ARGS+=(-v "$src:$dst:ro"); MOUNTED[$dst]=1; fi
  }
  for f in /etc/pip.conf /etc/xdg/pip/pip.conf "${PIP_CONFIG_FILE:-/nonexistent}"; do mount_ro "$f"; done
  mount_ro "$HOME/.config/pip/pip.conf" /root/.config/pip/pip.conf
  mount_ro "$HOME/.pip/pip.conf" /root/.pip/pip.conf
  # What the configuration names: CA bundles, constraint files, local indexes and wheel folders.
  while read -r value; do
    for word in $value; do
      case "$word" in
        file:///*) mount_ro "$(dirname "${word#file://}")" ;;  # an index's pages link to ../files
        /*) mount_ro "$word" ;;
      esac
    done
  done < <("${PYTHON:-python3}" -m pip config list 2>/dev/null | sed -E "s/^[^=]*='?//; s/'$//")
  for f in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" "${REQUESTS_CA_BUNDLE:-}" "${PIP_FIND_LINKS:-}"; do
    if [ -n "$f" ]; then mount_ro "$f"; fi
  done
fi
log "$ENGINE ${ARGS[*]} $CTX"
start=$(date +%s)
$ENGINE "${ARGS[@]}" "$CTX" >&2
log "built in $(( $(date +%s) - start )) s; size $($ENGINE image inspect --format '{{.Size}}' "$TAG" | awk '{printf "%.1f GB", $1 / 1e9}')"
echo "$TAG"
