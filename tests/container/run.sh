#!/usr/bin/env bash
# Build the image and check it the way an operator runs it: the daemon mirrors the bundled
# simulator into the /data volume as the non-root user, the HEALTHCHECK turns healthy,
# `verify` inside the container finds every file right, and `docker stop` ends it with
# exit 0 within the grace period.
#
# Needs a working Docker engine (`docker info`); prints one line and exits 0 without one.
# No image registry is needed: when the base image is missing it is made locally
# (make-base.sh). All traffic stays on loopback: the containers use the host's network.
set -euo pipefail
cd "$(dirname "$0")/../.."

started_engine=
# As root with Debian's docker.io installed but no engine running (a fresh CI run), start
# one for this check: no bridge, no iptables — the containers use the host's loopback only.
if ! docker info >/dev/null 2>&1 && command -v dockerd >/dev/null && [ "$(id -u)" = 0 ]; then
    dockerd --bridge=none --iptables=false >/tmp/nbia-sync-dockerd.log 2>&1 &
    started_engine=$!
    for _ in $(seq 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
fi
if ! docker info >/dev/null 2>&1; then
    echo "container check skipped: no Docker engine (docker info failed)"
    exit 0
fi

base=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile)
image=nbia-sync:container-check
tag=nbia-sync-check-$$
grace=20
work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
    docker rm -f "$tag-daemon" "$tag-sim" >/dev/null 2>&1 || true
    docker volume rm -f "$tag-data" >/dev/null 2>&1 || true
    rm -rf "$work"
    if [ -n "$started_engine" ]; then kill "$started_engine" 2>/dev/null || true; fi
}
trap cleanup EXIT
fail() { echo "container check FAILED: $*" >&2; docker logs "$tag-daemon" 2>&1 | tail -20 >&2 || true; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

if ! docker image inspect "$base" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { echo "container check skipped: no $base image and no debootstrap to make one"; exit 0; }
    bash tests/container/make-base.sh "$base"
fi
docker build --network host -t "$image" . >"$work/build.log" 2>&1 \
    || { tail -20 "$work/build.log" >&2; fail "docker build"; }

sim_port=$(free_port)
health_port=$(free_port)
# The simulator from the same image, as its own container.
docker run -d --name "$tag-sim" --network host "$image" \
    simulate --port "$sim_port" --collections SIM-CT,SIM-MR --patients 2 --series 2 --images 3 \
    >/dev/null
for _ in $(seq 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$sim_port/nbia-api/services/v4/getCollectionValues', timeout=1)" 2>/dev/null && break
    sleep 0.2
done

mkdir -p "$work/config"
cat >"$work/config/nbia-sync.toml" <<TOML
[mirror]
root = "/data"
min_free_bytes = 0

[transfer]
workers = 4
retry_base_delay = 0.1

[schedule]
poll_interval = 5

[logging]
format = "json"

[daemon]
listen_host = "0.0.0.0"
listen_port = $health_port

[[sources]]
name = "sim"
url = "http://127.0.0.1:$sim_port/nbia-api/"
api = "v4"
TOML
chmod -R a+rX "$work/config"

docker volume create "$tag-data" >/dev/null
docker run -d --name "$tag-daemon" --network host \
    -v "$tag-data:/data" -v "$work/config:/config:ro" \
    -e NBIA_SYNC_HEALTH_URL="http://127.0.0.1:$health_port/healthz" \
    --health-interval 1s --health-start-period 30s --health-retries 3 \
    --stop-timeout "$grace" "$image" >/dev/null

uid=$(docker exec "$tag-daemon" id -u)
[ "$uid" != 0 ] || fail "the daemon runs as root"
[ "$(docker exec "$tag-daemon" id -un)" = nbia ] || fail "the daemon does not run as user nbia"

health=
for _ in $(seq 60); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$tag-daemon")
    [ "$health" = healthy ] && break
    [ "$(docker inspect -f '{{.State.Running}}' "$tag-daemon")" = true ] || fail "the daemon exited"
    sleep 1
done
[ "$health" = healthy ] || fail "HEALTHCHECK is '$health' after 60 s"

done_count=0
for _ in $(seq 60); do
    done_count=$(docker exec "$tag-daemon" nbia-sync status --json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["series"].get("done", {}).get("count", 0))' || echo 0)
    [ "$done_count" = 8 ] && break
    sleep 1
done
[ "$done_count" = 8 ] || fail "$done_count of 8 series mirrored after 60 s"
docker exec "$tag-daemon" nbia-sync verify >/dev/null 2>&1 || fail "verify inside the container found problems"
owner=$(docker exec "$tag-daemon" stat -c %U /data/.nbia-sync)
[ "$owner" = nbia ] || fail "the volume's state is owned by '$owner'"

start=$(date +%s)
docker stop "$tag-daemon" >/dev/null
took=$(( $(date +%s) - start ))
code=$(docker inspect -f '{{.State.ExitCode}}' "$tag-daemon")
[ "$code" = 0 ] || fail "docker stop: exit code $code"
[ "$took" -lt "$grace" ] || fail "docker stop took ${took}s (grace ${grace}s)"

echo "container check passed: user $uid, healthy, $done_count series mirrored and verified, stopped with exit 0 in ${took}s"
