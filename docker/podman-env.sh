# Source this before podman on a machine whose podman defaults cannot run a container:
#   . docker/podman-env.sh
# Podman gives every container nofile/nproc limits of 1048576; where the host's hard limits are
# lower (containers inside containers, CI sandboxes) runc refuses with "error setting rlimits ...
# operation not permitted". Then this writes a containers.conf with the host's own limits, runc
# with cgroupfs (crun fails on hybrid cgroup hierarchies), file events (no journald) and the host's
# network (no bridge / CNI), points CONTAINERS_CONF at it and builds with chroot isolation. Elsewhere, or when CONTAINERS_CONF is
# already set, it changes nothing. DSPARK_PODMAN_STORAGE=vfs also selects the vfs storage driver
# (any filesystem; ~10 GB free for a CPU image build) for hosts where overlay does not mount.
_dspark_podman_env() {
  local dir="${DSPARK_PODMAN_CONF_DIR:-${XDG_RUNTIME_DIR:-/tmp}/dspark-podman}"
  local nofile nproc
  nofile=$(ulimit -Hn); nproc=$(ulimit -Hu)
  if [ -z "${CONTAINERS_CONF:-}" ] && { [ "$nofile" != unlimited ] && [ "$nofile" -lt 1048576 ] \
       || [ "$nproc" != unlimited ] && [ "$nproc" -lt 1048576 ]; }; then
    [ "$nofile" = unlimited ] && nofile=1048576
    # podman lowers its own process limit to 32768 before it starts a build step; asking more fails.
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
    mkdir -p "$dir"
    cat > "$dir/containers.conf" <<CONF
# Written by docker/podman-env.sh: the host's hard limits (nofile $nofile, nproc $nproc) are below podman's defaults.
[containers]
netns = "host"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
CONF
    export CONTAINERS_CONF="$dir/containers.conf"
    # Builds run their steps through the OCI runtime with buildah's own (higher) limits, which runc
    # cannot set here either; chroot isolation runs them without a new container.
    export BUILDAH_ISOLATION="${BUILDAH_ISOLATION:-chroot}"
  fi
  if [ "${DSPARK_PODMAN_STORAGE:-}" = vfs ] && [ -z "${CONTAINERS_STORAGE_CONF:-}" ]; then
    mkdir -p "$dir"
    printf '[storage]\ndriver = "vfs"\ngraphroot = "/var/lib/containers/vfs-storage"\nrunroot = "/run/containers/vfs-storage"\n' \
      > "$dir/storage.conf"
    export CONTAINERS_STORAGE_CONF="$dir/storage.conf"
  fi
}
_dspark_podman_env
unset -f _dspark_podman_env
