# Policy server image. CPU by default; the CUDA variant by build argument:
#   docker build -t policy-server .
#   docker build -t policy-server:cuda --build-arg BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg TORCH_SPEC="torch" .
# Run (the model store is a volume; keys come from the environment):
#   docker run -p 50000:50000 -v policy-store:/data/model-store \
#     -e POLICY_SERVER_API_KEY=... -e POLICY_SERVER_ADMIN_KEY=... policy-server
ARG BASE=python:3.11-slim
FROM ${BASE}

# The CPU build pins torch through constraints.txt; the CUDA variant installs the torch
# build that matches its base image instead.
ARG TORCH_SPEC=""
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 policy \
    && mkdir -p /data/model-store /app/logs && chown -R policy /data /app

WORKDIR /app
COPY setup.cfg pyproject.toml constraints.txt ./
COPY server.py gunicorn.conf.py locustfile.py ./
COPY binary_protocol.py openpi_wire.py image_codecs.py request_tools.py robot_loop.py chunk_merge.py ./
COPY policy_server ./policy_server
COPY policy_client ./policy_client
COPY models ./models
RUN python3 -m venv /opt/venv \
    && if [ -n "$TORCH_SPEC" ]; then /opt/venv/bin/pip install "$TORCH_SPEC"; fi \
    && /opt/venv/bin/pip install $( [ -z "$TORCH_SPEC" ] && echo "-c constraints.txt" ) '.[server]'
ENV PATH=/opt/venv/bin:$PATH \
    POLICY_SERVER_HOST=0.0.0.0 \
    POLICY_SERVER_PORT=50000 \
    POLICY_SERVER_MODEL_PATH=/app/models/default \
    POLICY_SERVER_MODEL_ROOT=/app/models \
    POLICY_SERVER_MODEL_STORE=/data/model-store \
    POLICY_SERVER_LOG_DIR=/app/logs

USER policy
VOLUME ["/data/model-store"]
EXPOSE 50000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:50000/health', timeout=2)"
# gunicorn with the project's config: settings from POLICY_SERVER_* (an API key is required
# to bind 0.0.0.0: pass POLICY_SERVER_API_KEY, or POLICY_SERVER_ALLOW_UNAUTHENTICATED=1 on
# a trusted network).
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
