#!/usr/bin/env bash
# Build the policy server image (and, with --nginx, the reverse proxy's) with podman, on
# Debian bases made here with mmdebstrap; pip in the build uses this machine's pip
# configuration read-only. Prints each image's size. Run as root.
#   deploy/build_image.sh [--nginx] [--cuda] [--no-cache]
#     --cuda: the CUDA variant (TORCH_SPEC=torch==2.14.1) as localhost/policy-server:cuda (~6 GB)
set -euo pipefail
source "$(dirname "$0")/lib.sh"

nginx=0 cuda=0 extra=()
for arg in "$@"; do
  case $arg in
    --nginx) nginx=1 ;;
    --cuda) cuda=1 ;;
    --no-cache) extra+=(--no-cache) ;;
    *) die "unknown option $arg" ;;
  esac
done

podman_prepare
debian_base "$RUNTIME_BASE" python3,libstdc++6
debian_base "$BUILD_BASE" python3,libstdc++6,python3-venv,python3-pip,ca-certificates
start=$(date +%s)
build "$POLICY_IMAGE" "$REPO" --build-arg BASE="$RUNTIME_BASE" --build-arg BUILD_BASE="$BUILD_BASE" "${extra[@]}"
echo "$POLICY_IMAGE: $(image_bytes "$POLICY_IMAGE") bytes, built in $(( $(date +%s) - start )) s"
if [ "$cuda" = 1 ]; then
  start=$(date +%s)
  build localhost/policy-server:cuda "$REPO" --build-arg BASE="$RUNTIME_BASE" --build-arg BUILD_BASE="$BUILD_BASE" \
    --build-arg TORCH_SPEC=torch==2.14.1 "${extra[@]}"
  echo "localhost/policy-server:cuda: $(image_bytes localhost/policy-server:cuda) bytes, built in $(( $(date +%s) - start )) s"
fi
if [ "$nginx" = 1 ]; then
  debian_base "$NGINX_BASE" nginx
  build "$NGINX_IMAGE" "$REPO/deploy/nginx" --build-arg BASE="$NGINX_BASE" "${extra[@]}"
  echo "$NGINX_IMAGE: $(image_bytes "$NGINX_IMAGE") bytes"
fi
