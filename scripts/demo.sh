#!/usr/bin/env bash
# The Sigma demo on this machine (`make demo`, `make demo-stop`).
#
#   scripts/demo.sh        start a dockerd (only if none answers), `sigmad dev` in the
#                          background, build sigma/busybox:latest, apply examples/web.yaml,
#                          wait until its instances run and curl one of them
#   scripts/demo.sh stop   stop the sigmad dev, and the dockerd, that the demo started
#
# Everything the demo starts is tracked under ~/.sigma/demo/ (pid files and logs).
# Running it again reuses what is already up.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

DEMO_DIR=${HOME}/.sigma/demo
DOCKER_SOCK=unix:///var/run/docker.sock
DOCKERD_PID=$DEMO_DIR/dockerd.pid
DOCKERD_LOG=$DEMO_DIR/dockerd.log
SIGMAD_PID=$DEMO_DIR/sigmad.pid
SIGMAD_LOG=$DEMO_DIR/sigmad.log
HEALTHZ=http://127.0.0.1:7475/healthz
SIGMAD=$root/.venv/bin/sigmad
SIGMACTL=$root/.venv/bin/sigmactl
PY=$root/.venv/bin/python
APP_FILE=examples/web.yaml
APP=web
NAMESPACE=default

if [[ -t 1 ]]; then
  say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
else
  say() { printf '==> %s\n' "$*"; }
fi
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# True if the pid in file $1 is alive and its command line mentions $2.
running_pid() {
  local file=$1 what=$2 pid
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  local cmdline
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$what"* ]]
}

# Send SIGTERM to the pid in file $1 (if it is $2), wait up to $3 seconds, then SIGKILL.
stop_pid() {
  local file=$1 what=$2 wait_s=$3 pid
  if ! running_pid "$file" "$what"; then
    rm -f "$file"
    return 1
  fi
  pid=$(<"$file")
  say "stopping $what (pid $pid)"
  kill -TERM "$pid"
  for ((i = 0; i < wait_s * 5; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$what did not stop within ${wait_s}s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

docker_up() { docker -H "$DOCKER_SOCK" info >/dev/null 2>&1; }
sigma_up() { curl -fs --max-time 2 "$HEALTHZ" >/dev/null 2>&1; }

stop() {
  local stopped=0
  stop_pid "$SIGMAD_PID" sigmad 30 && stopped=1
  stop_pid "$DOCKERD_PID" dockerd 30 && stopped=1
  if ((stopped)); then
    say "demo stopped (state kept in ~/.sigma/dev and $DEMO_DIR; 'make demo' resumes)"
  else
    echo "nothing to stop: the demo has no running sigmad or dockerd of its own"
  fi
}

start_dockerd() {
  if docker_up; then
    echo "docker engine: already answering on $DOCKER_SOCK"
    return
  fi
  [[ $(id -u) -eq 0 ]] || die "no docker engine answers on $DOCKER_SOCK and starting one needs root"
  command -v dockerd >/dev/null || die "dockerd is missing: run 'make deps'"
  if ! running_pid "$DOCKERD_PID" dockerd; then
    say "starting dockerd (data in $DEMO_DIR/docker, log $DOCKERD_LOG)"
    mkdir -p "$DEMO_DIR/docker"
    rm -f "$DOCKERD_PID"
    nohup setsid dockerd --data-root "$DEMO_DIR/docker" --exec-root /run/sigma-demo-docker \
      --pidfile "$DOCKERD_PID" -H "$DOCKER_SOCK" >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  for ((i = 0; i < 60; i++)); do
    docker_up && { echo "docker engine: up"; return; }
    sleep 0.5
  done
  tail -n 30 "$DOCKERD_LOG" >&2 || true
  die "dockerd did not answer within 30s (log: $DOCKERD_LOG)"
}

start_sigmad() {
  if sigma_up; then
    echo "sigmad: already answering on $HEALTHZ"
    return
  fi
  [[ -x $SIGMAD ]] || die "$SIGMAD is missing: run 'make deps'"
  if ! running_pid "$SIGMAD_PID" sigmad; then
    say "starting sigmad dev (log $SIGMAD_LOG)"
    echo "---- $(date -Is) sigmad dev" >>"$SIGMAD_LOG"
    nohup setsid "$SIGMAD" dev --engine "$DOCKER_SOCK" >>"$SIGMAD_LOG" 2>&1 </dev/null &
    echo $! >"$SIGMAD_PID"
  fi
  for ((i = 0; i < 120; i++)); do
    if sigma_up; then
      echo "sigmad: up ($HEALTHZ)"
      return
    fi
    if ! running_pid "$SIGMAD_PID" sigmad; then
      tail -n 30 "$SIGMAD_LOG" >&2 || true
      rm -f "$SIGMAD_PID"
      die "sigmad dev exited (log above, full log: $SIGMAD_LOG)"
    fi
    sleep 0.5
  done
  tail -n 30 "$SIGMAD_LOG" >&2 || true
  die "sigmad dev did not answer $HEALTHZ within 60s (log above, full log: $SIGMAD_LOG)"
}

# Prints one progress line; exits 0 once every wanted instance of the app is Running.
CHECK_INSTANCES=$(cat <<'PYEOF'
import json, sys, yaml
app, namespace, spec_file = sys.argv[1:4]
replicas = next(d for d in yaml.safe_load_all(open(spec_file)) if d and d.get("app") == app)
replicas = replicas.get("replicas", 1)
data = json.load(sys.stdin)
items = data.get("items", []) if isinstance(data, dict) else data
mine = [i for i in items if i.get("app") == app and i.get("namespace", "default") == namespace]
running = [i for i in mine if i.get("state") == "Running"]
states = ", ".join(
    f"{i.get('name')} {i.get('state')}" + (f" ({i['reason']})" if i.get("reason") else "")
    for i in mine
)
print(f"  {app}: {len(running)}/{replicas} Running" + (f" [{states}]" if states else ""))
sys.exit(0 if len(mine) == replicas and len(running) == replicas else 1)
PYEOF
)

wait_running() {
  say "waiting (up to 90s) for every instance of $APP to be Running"
  local deadline=$((SECONDS + 90)) out
  while true; do
    if ! out=$("$SIGMACTL" get instances -o json 2>&1); then
      echo "  sigmactl get instances: $(head -n 1 <<<"$out")"
    elif "$PY" -c "$CHECK_INSTANCES" "$APP" "$NAMESPACE" "$APP_FILE" <<<"$out"; then
      return
    fi
    if ((SECONDS >= deadline)); then
      "$SIGMACTL" get instances -o wide || true
      tail -n 30 "$SIGMAD_LOG" 2>/dev/null || true
      die "the instances of $APP were not all Running within 90s (sigmad log: $SIGMAD_LOG)"
    fi
    sleep 2
  done
}

show() {
  say "instances"
  "$SIGMACTL" get instances -o wide
  local ips
  ips=$("$SIGMACTL" get instances -o json | "$PY" -c '
import json, sys
data = json.load(sys.stdin)
items = data.get("items", []) if isinstance(data, dict) else data
for i in items:
    if i.get("app") == sys.argv[1] and i.get("state") == "Running" and i.get("ip"):
        print(i["ip"])
' "$APP")
  [[ -n $ips ]] || die "no instance of $APP reports an IP"
  say "reach them from this host"
  for ip in $ips; do
    echo "  curl http://$ip:8080/"
  done
  local first answer=""
  first=$(head -n 1 <<<"$ips")
  say "curl http://$first:8080/"
  for ((i = 0; i < 10; i++)); do
    answer=$(curl -fsS --max-time 3 "http://$first:8080/" 2>&1) && break
    answer=""
    sleep 1
  done
  [[ -n $answer ]] || die "http://$first:8080/ did not answer"
  echo "$answer"
  cat <<EOF

Try next (sigmactl is $SIGMACTL):
  sigmactl get nodes
  sigmactl get apps
  sigmactl describe instance $APP-0
  sigmactl apply -f examples/broken.yaml     # a spec error, nothing is written
  sigmactl delete app $APP
'make demo-stop' stops the demo.
EOF
}

main() {
  mkdir -p "$DEMO_DIR"
  command -v curl >/dev/null || die "curl is missing: run 'make deps'"
  [[ -x $SIGMACTL ]] || die "$SIGMACTL is missing: run 'make deps'"
  start_dockerd
  start_sigmad
  say "building sigma/busybox:latest"
  "$root/scripts/build-image.sh" "$DOCKER_SOCK" sigma/busybox:latest
  say "sigmactl apply -f $APP_FILE"
  "$SIGMACTL" apply -f "$APP_FILE"
  wait_running
  show
}

case "${1:-start}" in
  start) main ;;
  stop) stop ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
