#!/usr/bin/env bash
# `make container-test`: the README's `docker compose up` for real, with rootful podman instead of a
# Docker engine (none runs here, and no image registry can be pulled from):
#
#   1. a stand-in for python:3.11-slim-bookworm: `debootstrap --variant=minbase bookworm` (mirror
#      from this machine's apt sources) + python3/venv/pip, `python` at /usr/local/bin, the host's
#      extra CA certificates (pip inside the build verifies TLS against them);
#   2. the CPU image from docker/Dockerfile (`podman build --format docker --pull=never`: the OCI
#      format would drop HEALTHCHECK), its hashed lock installed from PyPI;
#   3. a stand-in for prom/prometheus:v2.53.0 carrying Debian's prometheus package;
#   4. `docker-compose up` of server + prometheus against `podman system service` (Grafana is left
#      out: it is not packaged for Debian, so no stand-in can be built here);
#   5. checks: /readyz, POST of real PNG and JPEG images, the image's HEALTHCHECK through
#      `podman healthcheck run` (no systemd timers here, so health checks run on demand), and that
#      Prometheus scrapes the server (up == 1, eed_ series present, the rule files loaded);
#   6. cleanup: containers, volumes, networks, images and the storage folder.
#
# podman runs with its own configuration and storage under $WORK (CONTAINERS_CONF,
# CONTAINERS_STORAGE_CONF), so nothing of the machine's container setup is used or changed:
# runc (crun refuses this host's mixed cgroup v1/v2 layout), cgroupfs, a file events logger and
# nofile/nproc ulimits within the host's hard limits (podman's defaults fail with setrlimit: EPERM).
#
# Needs root (rootful podman, debootstrap); installs podman, runc, debootstrap, netavark,
# aardvark-dns, iptables (netavark's firewall driver calls it) and docker-compose from Debian
# when missing. KEEP=1 keeps $WORK (images included)
# for a faster second run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${CONTAINER_TEST_DIR:-/var/tmp/eed-container-test}
PROJECT=eedct
BASE_IMAGE=python:3.11-slim-bookworm          # docker/Dockerfile's ARG PYTHON_IMAGE
PROM_IMAGE=$(sed -n 's/^ *image: *\(prom\/prometheus:.*\)$/\1/p' docker-compose.yml)
SERVER_IMAGE=eed-anytime-server:latest

log() { printf '\n== %s  %s\n' "$(date -u +%H:%M:%S)" "$*"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "needs root (rootful podman and debootstrap)"

# --- packages -------------------------------------------------------------------------------
need=()
for p in podman runc debootstrap netavark aardvark-dns iptables docker-compose; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# --- podman's own configuration and storage -------------------------------------------------
mkdir -p "$WORK"
nofile=$(ulimit -Hn)
[ "$nofile" = unlimited ] && nofile=1048576
# nproc: runc is refused values near the host's hard limit here (EPERM above ~32k): stay well below.
nproc=$(ulimit -Hu)
{ [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ]; } && nproc=16384
cat > "$WORK/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/events.log"
[network]
network_backend = "netavark"
EOF
driver=overlay
grep -qw overlay /proc/filesystems || driver=vfs
cat > "$WORK/storage.conf" <<EOF
[storage]
driver = "$driver"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
export CONTAINERS_CONF=$WORK/containers.conf CONTAINERS_STORAGE_CONF=$WORK/storage.conf
SOCKET=$WORK/podman.sock
service_pid=
healthcheck_pid=

COMPOSE=(env DOCKER_HOST="unix://$SOCKET" DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
         docker-compose -p "$PROJECT" -f docker-compose.yml)
compose() { "${COMPOSE[@]}" "$@"; }
PY=${PYTHON:-$ROOT/.venv/bin/python}  # has Pillow (the serve extra) for the test images
[ -x "$PY" ] || PY=python3

cleanup() {
  status=$?
  set +e
  if [ $status -ne 0 ] && [ -S "$SOCKET" ]; then
    log "logs of the failed run"
    compose logs --no-color --tail=80 2>&1 | tail -120
  fi
  [ -n "$healthcheck_pid" ] && kill "$healthcheck_pid" 2>/dev/null
  if [ -S "$SOCKET" ]; then
    log "compose down"
    compose down -v --remove-orphans >/dev/null 2>&1
  fi
  [ -n "$service_pid" ] && kill "$service_pid" 2>/dev/null && wait "$service_pid" 2>/dev/null
  podman rm -af -t 0 >/dev/null 2>&1
  if [ "${KEEP:-0}" != 1 ]; then
    log "removing $WORK"
    podman rmi -af >/dev/null 2>&1
    podman system reset -f >/dev/null 2>&1
    rm -rf "$WORK"
  fi
  exit $status
}
trap cleanup EXIT

# --- 1. the python:3.11-slim stand-in -------------------------------------------------------
if ! podman image exists "$BASE_IMAGE"; then
  # The Debian archive this machine's apt uses (not -security, not third-party repositories).
  mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | awk '/^(URIs:|deb )/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) {print $i; exit}}' || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  log "debootstrap bookworm (minbase) from $mirror"
  rootfs=$WORK/rootfs
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; fail debootstrap; }
  # The official image has `python` at /usr/local/bin; Debian's is python3 in /usr/bin.
  ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
  # TLS inside the builds goes through this machine's egress: trust what the host trusts.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
  fi
  # pip in a Debian rootfs refuses system installs (PEP 668); the Dockerfiles use venvs anyway.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  log "importing the rootfs as $BASE_IMAGE"
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
fi

# --- 2. the server image, as `docker compose build` would ------------------------------------
log "podman build docker/Dockerfile"
podman build --format docker --pull=never --network host \
  --build-arg GIT_REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
  -f docker/Dockerfile -t "$SERVER_IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; fail "image build"; }
podman image inspect "$SERVER_IMAGE" --format '{{json .Config.Healthcheck}}' | grep -q serving.healthcheck \
  || fail "the image has no HEALTHCHECK (built without --format docker?)"

# --- 3. the prom/prometheus stand-in ----------------------------------------------------------
if ! podman image exists "$PROM_IMAGE"; then
  log "building the $PROM_IMAGE stand-in from Debian's prometheus"
  mkdir -p "$WORK/prometheus-image"
  cat > "$WORK/prometheus-image/Containerfile" <<EOF
FROM $BASE_IMAGE
RUN apt-get update && apt-get install -y --no-install-recommends prometheus wget \\
    && rm -rf /var/lib/apt/lists/* \\
    && mkdir -p /prometheus /usr/share/prometheus/console_libraries /usr/share/prometheus/consoles \\
    && chown nobody:nogroup /prometheus
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
  podman build --format docker --pull=never --network host -t "$PROM_IMAGE" "$WORK/prometheus-image" \
    >"$WORK/prometheus-build.log" 2>&1 || { tail -30 "$WORK/prometheus-build.log"; fail "prometheus stand-in"; }
fi

# --- 4. docker-compose against podman's Docker API ------------------------------------------
log "podman system service"
rm -f "$SOCKET"
podman system service --time=0 "unix://$SOCKET" >"$WORK/service.log" 2>&1 &
service_pid=$!
for _ in $(seq 100); do [ -S "$SOCKET" ] && break; sleep 0.1; done
[ -S "$SOCKET" ] || fail "podman system service did not start: $(cat "$WORK/service.log")"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
export SERVER_PORT=${SERVER_PORT:-$(free_port)} PROMETHEUS_PORT=${PROMETHEUS_PORT:-$(free_port)}
export EED_WARMUP_RUNS=1 EED_CALIBRATION_RUNS=3 EED_LOG_LEVEL=warning

# compose waits for the server's health (prometheus depends on service_healthy), but podman has no
# timers here to run health checks: run them on demand while compose waits.
(
  while true; do
    for c in $(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" 2>/dev/null); do
      podman healthcheck run "$c" >/dev/null 2>&1 || true
    done
    sleep 2
  done
) &
healthcheck_pid=$!

log "docker-compose up server prometheus (Grafana left out: no Debian package to stand in for it)"
timeout 600 "${COMPOSE[@]}" up -d --no-build server prometheus || fail "docker-compose up"

server=http://127.0.0.1:$SERVER_PORT
prom=http://127.0.0.1:$PROMETHEUS_PORT
wait_for() {  # URL, seconds: until it answers 2xx
  "$PY" - "$1" "$2" <<'EOF'
import sys, time, urllib.request
url, deadline = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < deadline:
    try:
        urllib.request.urlopen(url, timeout=5)
        sys.exit(0)
    except Exception:
        time.sleep(1)
sys.exit(1)
EOF
}
wait_for "$server/readyz" 180 || fail "/readyz never answered 200"
log "server ready; classifying images"

# --- 5. checks --------------------------------------------------------------------------------
"$PY" - "$server" <<'EOF'
import io, json, sys, urllib.request
from PIL import Image

url = sys.argv[1]
info = json.load(urllib.request.urlopen(url + "/v1/model", timeout=30))
classes = info["manifest"]["classes"]
# The image's lock carries onnx, so `auto` could build and time the fused cascade graph.
assert "not installed" not in info["cascade_graph"]["runs"], info["cascade_graph"]
print("cascades run", info["cascade_graph"]["runs"])
for fmt, ctype in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(buf, format=fmt)
    req = urllib.request.Request(url + "/classify?top_k=3", data=buf.getvalue(), headers={"Content-Type": ctype})
    body = json.load(urllib.request.urlopen(req, timeout=60))
    assert body["class_name"] in classes and len(body["top_k"]) == 3, body
    print(f"{fmt}: exit {body['exit']} -> {body['class_name']} ({body['probability']:.3f})")
EOF

cid=$(podman ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=server")
[ -n "$cid" ] || fail "no server container"
podman healthcheck run "$cid" >/dev/null || fail "HEALTHCHECK of the server image failed"
[ "$(podman inspect "$cid" --format '{{.State.Health.Status}}')" = healthy ] || fail "server not healthy"
log "HEALTHCHECK passes (podman healthcheck run)"

wait_for "$prom/-/ready" 60 || fail "Prometheus not ready"
"$PY" - "$prom" <<'EOF'
import json, sys, time, urllib.parse, urllib.request

prom = sys.argv[1]

def query(expr):
    q = urllib.parse.urlencode({"query": expr})
    return json.load(urllib.request.urlopen(f"{prom}/api/v1/query?{q}", timeout=10))["data"]["result"]

deadline = time.time() + 90
while True:
    up = query('up{job="eed"}')
    series = query('count({__name__=~"eed_.+", job="eed"})')
    if up and up[0]["value"][1] == "1" and series and int(series[0]["value"][1]) > 0:
        break
    if time.time() > deadline:
        sys.exit(f"Prometheus does not scrape the server: up={up} eed series={series}")
    time.sleep(2)
groups = json.load(urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=10))["data"]["groups"]
names = {g["name"] for g in groups}
assert {"eed-serving", "eed-alerts"} <= names, names
print(f"Prometheus: up{{job=\"eed\"}} = 1, {series[0]['value'][1]} eed_ series, rule groups {sorted(names)}")
EOF

log "container test passed"
