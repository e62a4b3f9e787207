# syntax=docker/dockerfile:1.7
# promptserve on a CUDA host: `docker build -t promptserve .` (see deploy/README.md).
#
# Two stages on the same CUDA runtime base (so the venv's python path is the same in both):
# `build` installs the dependencies into /opt/venv (a layer cached until pyproject.toml
# changes), then the code; `runtime` copies only the venv, with no compiler, pip cache or
# apt lists. torch is the package registry's default build, which bundles its CUDA libraries.
# Weights and the store live on mounted volumes; every setting comes from PROMPTSERVE_* variables.

ARG CUDA_BASE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_BASE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first: this layer is reused until pyproject.toml changes, not on every code edit.
COPY pyproject.toml ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
# Then the code, without touching the dependency layer.
COPY README.md ./
COPY service ./service
COPY prompts_store ./prompts_store
COPY promptserve ./promptserve
RUN --mount=type=cache,target=/root/.cache/pip pip install --no-deps . \
 && find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

FROM ${CUDA_BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 promptserve \
 && useradd --system --uid 10001 --gid promptserve --home-dir /home/promptserve --create-home promptserve \
 && mkdir -p /data /weights /cache \
 && chown promptserve:promptserve /data /cache
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    PROMPTSERVE_HOST=0.0.0.0 \
    PROMPTSERVE_PORT=8000 \
    PROMPTSERVE_DEVICE=cuda \
    PROMPTSERVE_STORE=file:///data/store \
    PROMPTSERVE_ONNX_CACHE_DIR=/data/onnx \
    PROMPTSERVE_RUNS_DIR=/data/runs \
    PROMPTSERVE_CACHE_DIR=/cache/open_clip \
    PROMPTSERVE_LOG_FORMAT=json
# /weights: backbone weights, mounted read-only (PROMPTSERVE_PRETRAINED=/weights/FILE);
# /data: the file store and exported graphs; /cache: pretrained tags downloaded at start.
VOLUME ["/data", "/cache"]
USER promptserve
WORKDIR /home/promptserve
EXPOSE 8000
# Alive, not ready: the backbone may take minutes to load; readiness is /readyz (compose, k8s).
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PROMPTSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["promptserve"]
CMD ["serve"]
