# Policy server image: CPU by default, CUDA by build argument. It runs unchanged with a
# read-only root filesystem, every capability dropped, no-new-privileges and any uid.
# Build (podman needs --format docker, or the HEALTHCHECK is dropped):
#   docker build -t policy-server .
#   podman build --format docker -t policy-server .
# CUDA (torch's CUDA wheels carry the CUDA libraries; the host gives the driver):
#   podman build --format docker --build-arg TORCH_SPEC=torch==2.14.1 -t policy-server:cuda .
# Run (docs/deployment.md; keys from files, the store and logs on volumes):
#   docker run --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
#     -v policy-store:/data/model-store -v policy-logs:/app/logs -v "$PWD/keys:/run/secrets/policy:ro" \
#     -e POLICY_SERVER_API_KEY_FILE=/run/secrets/policy/api-key \
#     -e POLICY_SERVER_ADMIN_KEY_FILE=/run/secrets/policy/admin-key -p 127.0.0.1:50000:50000 policy-server
# deploy/build_image.sh builds it on a Debian base made locally (BASE and BUILD_BASE below).
# checkov:skip=CKV_DOCKER_7:the bases are build arguments whose default names a version (python:3.11-slim)
ARG BASE=python:3.11-slim
ARG BUILD_BASE=${BASE}

# -- build: the virtual environment, then everything in it that serving never opens removed
FROM ${BUILD_BASE} AS build
# The CPU build pins torch through constraints.txt; the CUDA variant installs the torch
# build it names instead (and its dependencies unpinned).
ARG TORCH_SPEC=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY setup.cfg pyproject.toml constraints.txt ./
COPY binary_protocol.py openpi_wire.py request_tools.py robot_loop.py ./
COPY policy_server ./policy_server
COPY policy_client ./policy_client
# Removed after the install: pip and setuptools (nothing installs at run time), torch's C++
# headers, tests and test binaries, cmake files and protoc (for building extensions and
# torch.compile's C++ code, which needs a compiler the image does not have either).
RUN python3 -m venv /opt/venv \
    && if [ -n "$TORCH_SPEC" ]; then /opt/venv/bin/pip install "$TORCH_SPEC"; fi \
    && /opt/venv/bin/pip install $( [ -z "$TORCH_SPEC" ] && echo "-c constraints.txt" ) '.[server]' \
    && /opt/venv/bin/python -m pip uninstall --yes --quiet setuptools pip \
    && cd /opt/venv/lib/python3*/site-packages \
    && rm -rf torch/include torch/test torch/share torch/bin/protoc* torch/bin/test_* torch/bin/*Test \
        _distutils_hack distutils-precedence.pth \
    && find /opt/venv -name '*.a' -delete

# -- run time: Python, the venv, the two entry files and the shipped models; nothing else
FROM ${BASE}
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*; \
    fi \
    && echo 'policy:x:10001:0:policy server:/tmp:/usr/sbin/nologin' >> /etc/passwd \
    && mkdir -p /data/model-store /app/logs \
    && chown 10001:0 /data/model-store /app/logs && chmod 0775 /data/model-store /app/logs
# Group 0 owns what the server writes: an arbitrary uid (OpenShift) runs in group 0, so it
# writes the store and logs as uid 10001 does. Every other write goes to /tmp (run dir,
# Prometheus files) or /dev/shm (gunicorn's heartbeat files): a tmpfs under --read-only.
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY server.py gunicorn.conf.py ./
COPY models ./models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    POLICY_SERVER_HOST=0.0.0.0 \
    POLICY_SERVER_PORT=50000 \
    POLICY_SERVER_MODEL_PATH=/app/models/default \
    POLICY_SERVER_MODEL_ROOT=/app/models \
    POLICY_SERVER_MODEL_STORE=/data/model-store \
    POLICY_SERVER_LOG_DIR=/app/logs

# Numeric, so a kubelet can check runAsNonRoot against it.
USER 10001:0
# Writable even under --read-only when nothing is mounted there (an anonymous volume each).
VOLUME ["/data/model-store", "/app/logs"]
EXPOSE 50000
# Probes where the server binds, from the same POLICY_SERVER_* settings (port, Unix socket, TLS).
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python3", "-m", "policy_server.healthcheck"]
# gunicorn with the project's config; SIGTERM drains (graceful_timeout_s). An API key is
# required to bind 0.0.0.0: POLICY_SERVER_API_KEY_FILE (or POLICY_SERVER_API_KEY), or
# POLICY_SERVER_ALLOW_UNAUTHENTICATED=1 on a trusted network.
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
