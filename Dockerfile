# syntax=docker/dockerfile:1.7
# mergeline images: one file, two targets.
#
#   docker build --target api    -t mergeline-api:0.1.0 .      # API, migrations, one-shot jobs (CPU torch)
#   docker build --target worker -t mergeline-worker:0.1.0 .   # Celery fold worker (CUDA torch)
#
# torch is installed first and pinned (the Makefile's pin), then `pip install -e .`, whose `torch>=2.4` the
# pinned build already satisfies. The install is editable, with the source at /app, because
# app/core/migrate.py finds alembic.ini and migrations/ next to the package's source (as in a checkout);
# a non-editable install would put the package in site-packages, away from them. The API never folds, so it gets the CPU build from PyTorch's CPU index (~200 MB
# instead of several GB). The worker gets the default PyPI build for linux/x86_64, which is CUDA-enabled and
# carries its own CUDA runtime as nvidia-* wheels: no CUDA base image is needed, only the host's NVIDIA driver
# and the NVIDIA container toolkit (Docker) or device plugin (Kubernetes). To use another CUDA build, pass
# e.g. --build-arg WORKER_TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128.

ARG PYTHON_VERSION=3.12
ARG TORCH_VERSION=2.13.0

# ---- runtime base: what both final images share --------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# tini is PID 1: it forwards SIGTERM to `mergeline` (so uvicorn and Celery shut down warm) and reaps orphans.
# The data directory is created owned by the service user so that named volumes inherit that ownership.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 mergeline \
 && useradd --system --uid 10001 --gid mergeline --home-dir /var/lib/mergeline --no-create-home \
      --shell /usr/sbin/nologin mergeline \
 && install -d -o mergeline -g mergeline -m 0750 /var/lib/mergeline
WORKDIR /app

# ---- build stages: a virtualenv in /opt/venv, one per torch build -----------------------------------------
FROM runtime-base AS build-base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv && pip install --no-cache-dir --upgrade pip

FROM build-base AS build-api
ARG TORCH_VERSION
ARG API_TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${API_TORCH_INDEX_URL}"
COPY . /app
RUN --mount=type=cache,target=/root/.cache/pip pip install -e /app

FROM build-base AS build-worker
ARG TORCH_VERSION
ARG WORKER_TORCH_INDEX_URL=https://pypi.org/simple
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==${TORCH_VERSION}" --index-url "${WORKER_TORCH_INDEX_URL}"
COPY . /app
RUN --mount=type=cache,target=/root/.cache/pip pip install -e /app

# ---- api: `mergeline serve` (also runs `mergeline migrate` and the bucket step) ---------------------------
FROM runtime-base AS api
COPY --from=build-api /opt/venv /opt/venv
# The editable install in /opt/venv points at this source tree (with alembic.ini and migrations/).
COPY --from=build-api /app /app
# Production API mode: listen on all interfaces, no embedded worker. Settings refuses to start an open API
# off loopback, so MERGELINE_TOKENS must come from a secret at run time.
ENV MERGELINE_HOST=0.0.0.0 \
    MERGELINE_PORT=8000 \
    MERGELINE_EMBEDDED_WORKER=false \
    MERGELINE_DATA_DIR=/var/lib/mergeline
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["tini", "--"]
CMD ["mergeline", "serve"]

# ---- worker: `mergeline worker`, one fold at a time per GPU -----------------------------------------------
FROM runtime-base AS worker
COPY --from=build-worker /opt/venv /opt/venv
COPY --from=build-worker /app /app
# Visibility of GPUs is left to the runtime (compose device reservation / k8s device plugin); only ask the
# NVIDIA runtime for the libraries CUDA compute needs.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MERGELINE_DEVICE=auto \
    MERGELINE_DATA_DIR=/var/lib/mergeline
USER 10001:10001
ENTRYPOINT ["tini", "--"]
CMD ["mergeline", "worker", "--concurrency", "1"]
