# Shared by the scripts in deploy/ (sourced, never run): podman set up for this kind of
# machine, Debian base images made locally with mmdebstrap, and image builds whose pip uses
# this machine's pip configuration read-only. Run the scripts as root from anywhere.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
POLICY_IMAGE=${POLICY_IMAGE:-localhost/policy-server:cpu}
NGINX_IMAGE=${NGINX_IMAGE:-localhost/policy-nginx:bookworm}
# Two bases from one Debian release, so the venv built on the first runs on the second:
RUNTIME_BASE=localhost/policy-base:bookworm        # python3 only: what the image ships
BUILD_BASE=localhost/policy-build-base:bookworm    # + venv, pip, CA certificates: the build stage
NGINX_BASE=localhost/policy-nginx-base:bookworm    # nginx from Debian's packages
SUITE=bookworm

die() { echo "error: $*" >&2; exit 1; }

# Root, the tools (installed from Debian's packages when missing) and a containers.conf for
# this VM: it has no CAP_SYS_RESOURCE (nofile hard limit 20000, and podman would lower nproc)
# and a cgroup layout crun refuses, so runc and fixed ulimits. A CONTAINERS_CONF already set wins.
podman_prepare() {
  [ "$(id -u)" = 0 ] || die "run as root (podman builds and runs images here as root)"
  if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
  fi
  if [ -z "${CONTAINERS_CONF:-}" ]; then
    local tmp
    tmp=$(mktemp /tmp/policy-containers.XXXXXX)
    cat > "$tmp" <<'CONF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
    export CONTAINERS_CONF=/tmp/policy-containers.conf  # one file, the same for every run
    mv -f "$tmp" "$CONTAINERS_CONF"
  fi
}

# debian_base IMAGE PACKAGES: Debian's essential packages and PACKAGES (comma-separated), no
# apt, docs, man pages or locales (copyright files kept), /usr merged without the usrmerge
# package (which would pull in perl), imported as IMAGE; kept once made.
debian_base() {
  local image=$1 packages=$2 tar log
  podman image exists "$image" && return 0
  tar=$(mktemp /tmp/policy-base.XXXXXX.tar)
  log=$(mktemp /tmp/policy-base.XXXXXX.log)
  mmdebstrap --variant=essential --include="$packages" --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    "$SUITE" "$tar" >"$log" 2>&1 || { tail -20 "$log"; rm -f "$tar" "$log"; die "mmdebstrap failed for $image"; }
  podman import --quiet --change 'CMD ["/bin/bash"]' "$tar" "$image" >/dev/null
  rm -f "$tar" "$log"
}

# The -v options that give a build's RUN steps this machine's pip configuration, read-only.
pip_mounts() {
  local path
  while IFS= read -r path; do
    [ -n "$path" ] && printf -- '-v\n%s:%s:ro\n' "$path" "$path"
  done < <(python3 "$REPO/deploy/pip_config_paths.py")
}

# build IMAGE CONTEXT [podman build options...]: with the HEALTHCHECK kept (docker format).
build() {
  local image=$1 context=$2 log
  shift 2
  local -a mounts
  mapfile -t mounts < <(pip_mounts)
  log=$(mktemp /tmp/policy-build.XXXXXX.log)
  if ! podman build --network host --format docker "${mounts[@]}" -t "$image" "$@" "$context" >"$log" 2>&1; then
    tail -40 "$log"
    rm -f "$log"
    die "building $image failed"
  fi
  rm -f "$log"
}

image_bytes() { podman image inspect "$1" --format '{{.Size}}'; }
