#!/usr/bin/env bash
# The image built and run as a hardened cluster would run it (`make container-test`; root,
# podman): read-only root filesystem with a tmpfs /tmp only, every capability dropped,
# no-new-privileges, an arbitrary uid in group 0, keys from files, a port that is not the
# default. It checks inference, the keys, an update into the store volume, the HEALTHCHECK on
# that port, and a drain: SIGTERM while a request is in flight loses nothing.
# All traffic stays on the loopback of a network namespace made here.
#   deploy/container_test.sh [--no-build]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
[ -x "$PY" ] || die "no $PY: run make install first"
build=1
[ "${1:-}" = --no-build ] && build=0

podman_prepare
W=$(mktemp -d /tmp/policy-ctest.XXXXXX)
NS=policy-ctest-$$ CTR=policy-ctest-$$ STORE=policy-ctest-store-$$ LOGS=policy-ctest-logs-$$
cleanup() {
  local rc=$?
  [ "$rc" -ne 0 ] && podman logs --tail 30 "$CTR" 2>&1 | grep -v 'systemd' || true
  podman rm -f -t 5 "$CTR" >/dev/null 2>&1 || true
  podman volume rm -f "$STORE" "$LOGS" >/dev/null 2>&1 || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$W"
  [ "$rc" -eq 0 ] && echo "container test passed" || echo "container test FAILED"
  return "$rc"
}
trap cleanup EXIT

[ "$build" = 1 ] && bash "$REPO/deploy/build_image.sh"
echo "image: $(image_bytes "$POLICY_IMAGE") bytes"

# Keys as a Secret would mount them: root-owned, group 0 may read (0640), one line with a newline.
mkdir -m 0750 "$W/keys"
head -c 24 /dev/urandom | base64 > "$W/keys/api-key"
head -c 24 /dev/urandom | base64 > "$W/keys/admin-key"
chmod 0640 "$W/keys/api-key" "$W/keys/admin-key"
export POLICY_API_KEY POLICY_ADMIN_KEY
POLICY_API_KEY=$(cat "$W/keys/api-key") POLICY_ADMIN_KEY=$(cat "$W/keys/admin-key")
mkdir -m 0755 "$W/models"
"$PY" deploy/container_checks.py held-model "$W/models" >/dev/null

ip netns add "$NS"
ip -n "$NS" link set lo up
PORT=50123 URL=http://127.0.0.1:50123
t0=$(date +%s.%N)
podman run -d --name "$CTR" --network "ns:/run/netns/$NS" \
  --read-only --read-only-tmpfs=false --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  --user 123456:0 \
  -v "$STORE:/data/model-store" -v "$LOGS:/app/logs" \
  -v "$W/keys:/run/secrets/policy:ro" -v "$W/models:/models:ro" \
  -e POLICY_SERVER_API_KEY_FILE=/run/secrets/policy/api-key \
  -e POLICY_SERVER_ADMIN_KEY_FILE=/run/secrets/policy/admin-key \
  -e POLICY_SERVER_PORT=$PORT -e POLICY_SERVER_WORKERS=2 -e POLICY_SERVER_THREADS=4 -e POLICY_SERVER_DEADLINE_MS=10000 \
  -e POLICY_SERVER_MODEL_PATH=/models/held -e POLICY_SERVER_MODEL_ROOT=/models \
  "$POLICY_IMAGE" >/dev/null 2>&1
ip netns exec "$NS" "$PY" deploy/container_checks.py ready "$URL" "$CTR" >/dev/null
echo "cold start to /ready: $(echo "$(date +%s.%N) - $t0" | bc | xargs printf '%.1f') s (empty store: seeded first)"

# The hardening, seen from inside.
[ "$(podman exec "$CTR" id -u)" = 123456 ] || die "not running as uid 123456"
podman exec "$CTR" grep -q '^CapEff:[[:space:]]*0000000000000000$' /proc/1/status || die "capabilities left"
podman exec "$CTR" grep -q '^NoNewPrivs:[[:space:]]*1$' /proc/1/status || die "no-new-privileges not set"
podman exec "$CTR" sh -c 'touch /app/x 2>/dev/null' && die "the root filesystem is writable"
! podman exec "$CTR" sh -c 'env | grep -q "^POLICY_SERVER_API_KEY="' || die "the key is in the environment"
echo "hardening: uid 123456 gid 0, no capabilities, no-new-privileges, read-only root, key not in env"

ip netns exec "$NS" "$PY" deploy/container_checks.py smoke "$URL"
[ "$(podman inspect --format '{{.HealthCheck.Test}}' "$POLICY_IMAGE")" != "" ] || die "no HEALTHCHECK in the image"
podman healthcheck run "$CTR" 2>/dev/null || die "HEALTHCHECK unhealthy on port $PORT"
echo "HEALTHCHECK: healthy on port $PORT"
podman exec "$CTR" sh -c 'ls /data/model-store/default/versions | wc -l' | grep -qx 2 || die "the store volume lacks the update"

ip netns exec "$NS" "$PY" deploy/container_checks.py drain "$URL" "$CTR"
podman logs "$CTR" 2>&1 | grep -q "final metrics written" || die "no final metrics after the drain"
