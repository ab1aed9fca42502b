#!/usr/bin/env bash
# deploy/compose.yaml for real (`make compose-demo`; root, podman): two instances of the image
# sharing one store volume behind nginx, published on 127.0.0.1 only. Measures cold start to
# /ready, checks the store's lock (one seed version from two instances), sends /update_model
# through the proxy and times its reach to both instances, runs openpi's WebSocket wire through
# the proxy (one connection idle past nginx's default timeout), then stops one instance
# (SIGTERM) under a PolicyClient load through the proxy and counts the requests lost (must be 0).
#   deploy/compose_demo.sh [--no-build]
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$REPO"
PY=${PY:-$REPO/.venv/bin/python}
[ -x "$PY" ] || die "no $PY: run make install first"
PODMAN_COMPOSE_SPEC=podman-compose==1.6.0
build=1
[ "${1:-}" = --no-build ] && build=0

podman_prepare
[ "$build" = 1 ] && bash "$REPO/deploy/build_image.sh" --nginx
if [ ! -x "$REPO/.venv/compose/bin/podman-compose" ]; then  # a tool of its own, out of the project's venv
  python3 -m venv "$REPO/.venv/compose"
  "$REPO/.venv/compose/bin/pip" install --quiet --disable-pip-version-check "$PODMAN_COMPOSE_SPEC"
fi
W=$(mktemp -d /tmp/policy-compose.XXXXXX)
PROJECT=policy-demo-$$
export POLICY_KEYS=$W/keys POLICY_PORT
POLICY_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
compose() { "$REPO/.venv/compose/bin/podman-compose" -f "$REPO/deploy/compose.yaml" -p "$PROJECT" "$@"; }
cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    for c in policy-a policy-b proxy; do podman logs --tail 15 "${PROJECT}_${c}_1" 2>&1 | grep -v systemd; done
  fi
  compose down -v -t 10 >/dev/null 2>&1 || true
  rm -rf "$W"
  [ "$rc" -eq 0 ] && echo "compose demo passed" || echo "compose demo FAILED"
  return "$rc"
}
trap cleanup EXIT

mkdir -m 0750 "$POLICY_KEYS"
head -c 24 /dev/urandom | base64 > "$POLICY_KEYS/api-key"
head -c 24 /dev/urandom | base64 > "$POLICY_KEYS/admin-key"
chmod 0640 "$POLICY_KEYS/api-key" "$POLICY_KEYS/admin-key"
export POLICY_API_KEY POLICY_ADMIN_KEY
POLICY_API_KEY=$(cat "$POLICY_KEYS/api-key") POLICY_ADMIN_KEY=$(cat "$POLICY_KEYS/admin-key")

PROXY=http://127.0.0.1:$POLICY_PORT
t0=$(date +%s.%N)
compose up -d >"$W/up.log" 2>&1 || { cat "$W/up.log"; die "compose up failed"; }
# Each instance directly, on the compose network (its address seen from this host), and the proxy.
ip_of() { podman inspect --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "${PROJECT}_$1_1"; }
A=http://$(ip_of policy-a):50000 B=http://$(ip_of policy-b):50000
"$PY" deploy/container_checks.py ready "$A" "${PROJECT}_policy-a_1" >/dev/null
"$PY" deploy/container_checks.py ready "$B" "${PROJECT}_policy-b_1" >/dev/null
"$PY" deploy/container_checks.py ready "$PROXY" >/dev/null
echo "cold start, compose up to both instances and the proxy ready: $(echo "$(date +%s.%N) - $t0" | bc | xargs printf '%.1f') s"
seeded=$(podman exec "${PROJECT}_policy-a_1" ls /data/model-store/default/versions | wc -l)
[ "$seeded" = 1 ] || die "two instances seeding one store made $seeded versions: the lock did not hold"
echo "store: one seed version from two instances starting together (the lock held)"

for scale in 0.001 0.002 0.003; do
  "$PY" deploy/compose_demo.py update "$PROXY" "$A" "$B" --scale "$scale"
done
"$PY" deploy/compose_demo.py websocket "ws://127.0.0.1:$POLICY_PORT"
"$PY" deploy/compose_demo.py stop-one "$PROXY" "${PROJECT}_policy-b_1"
podman logs "${PROJECT}_policy-b_1" 2>&1 | grep -q "final metrics written" || die "policy-b did not drain and exit cleanly"
echo "image sizes: server $(image_bytes "$POLICY_IMAGE") bytes, nginx $(image_bytes "$NGINX_IMAGE") bytes"
