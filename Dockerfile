# syntax=docker/dockerfile:1
# FinFlow image: `finflow worker` by default; `finflow migrate`, `finflow loadgen ...` and
# `finflow api` run from the same image by overriding the command.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: build the project's wheel and install it (runtime deps only) into a venv ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/finflow
WORKDIR /src
# Every install_requires dependency ships a manylinux wheel for CPython 3.11, so no compiler.
COPY pyproject.toml setup.cfg README.md ./
COPY finflow ./finflow
COPY agents ./agents
COPY tables ./tables
COPY models ./models
RUN /opt/finflow/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/finflow/bin/pip install --only-binary=:all: /wheels/finflow-*.whl

# --- runtime: the venv only, as an unprivileged user ---
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="finflow" \
      org.opencontainers.image.description="Real-time transaction monitoring on Kafka and Faust" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 finflow \
 && useradd --system --uid 10001 --gid finflow --no-create-home \
      --home-dir /var/lib/finflow --shell /usr/sbin/nologin finflow \
 && install -d -o finflow -g finflow -m 0750 /var/lib/finflow
COPY --from=builder /opt/finflow /opt/finflow
ENV PATH=/opt/finflow/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FINFLOW_DATA_DIR=/var/lib/finflow \
    FINFLOW_WEB_PORT=6066
WORKDIR /var/lib/finflow
USER 10001:10001
# RocksDB table state; rebuilt from the changelogs when lost, but keeping it saves recovery time.
VOLUME ["/var/lib/finflow"]
EXPOSE 6066
# /healthz answers 200 while the process runs (/readyz is for traffic, not for restarts).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('FINFLOW_WEB_PORT', '6066'), timeout=4)"]
ENTRYPOINT ["finflow"]
CMD ["worker"]
