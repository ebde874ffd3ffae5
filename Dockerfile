# nbia-sync as a container: the daemon, mirroring into /data, configured from /config.
#
#   docker build -t nbia-sync .
#   docker run -d --name nbia-sync -p 9469:9469 \
#       -v nbia-data:/data -v "$PWD/config:/config:ro" nbia-sync
#
# The default source is TCIA's public v4 API (no login). A v2 source with an account takes
# its password from the environment: -e NBIA_SYNC_SOURCE_<NAME>_PASSWORD=...
#
# The image carries a default /config/nbia-sync.toml (config.example.toml with
# mirror.root = "/data" and daemon.listen_host = "0.0.0.0"); mount your own over /config.
# listen_host MUST be 0.0.0.0 in a container: on 127.0.0.1 the published port (Prometheus,
# an orchestrator's probe) cannot reach /metrics or /healthz, although the HEALTHCHECK
# below, which runs inside the container, would still pass.
# The base is a build argument so an offline machine can build on a local stand-in with the
# same name and shape (tests/container/run.sh makes one with debootstrap when it is missing).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md config.example.toml ./
COPY nbia_sync ./nbia_sync
COPY migrations ./migrations
RUN pip install . \
    && useradd --system --uid 10001 --user-group --home-dir /nonexistent \
        --shell /usr/sbin/nologin nbia \
    && mkdir -p /data /config \
    && sed -e 's|^root = "./mirror"|root = "/data"|' \
           -e 's|^listen_host = "127.0.0.1"|listen_host = "0.0.0.0"|' \
           config.example.toml > /config/nbia-sync.toml \
    && grep -q '^root = "/data"' /config/nbia-sync.toml \
    && grep -q '^listen_host = "0.0.0.0"' /config/nbia-sync.toml \
    && chown -R nbia:nbia /data /config \
    && cd / && rm -rf /src

WORKDIR /data
USER nbia

ENV NBIA_SYNC_CONFIG=/config/nbia-sync.toml \
    NBIA_SYNC_HEALTH_URL=http://127.0.0.1:9469/healthz

VOLUME ["/data", "/config"]
# /healthz and /metrics (daemon.listen_port)
EXPOSE 9469

# 503 (last pass failed hard, or the loop is stuck) and no answer both fail the check.
# If you change daemon.listen_port, set NBIA_SYNC_HEALTH_URL to match.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['NBIA_SYNC_HEALTH_URL'], timeout=8)"]

ENTRYPOINT ["nbia-sync"]
CMD ["-c", "/config/nbia-sync.toml", "daemon"]
