#!/usr/bin/env bash
# The Sigma demo on a 3-host lab on this machine (`make demo`, `make demo-stop`). Needs root.
#
#   scripts/demo.sh        reuse the lab `sigma` if it is healthy, else build it with
#                          `sigmad lab up --hosts 3` (3 network-namespace hosts, a dockerd and an
#                          agent each, a registry holding the busybox image, etcd, a master);
#                          apply examples/lab-web.yaml (6 replicas of busybox httpd, spread over
#                          the zones) with the lab's image, wait until every instance is Running,
#                          then fetch every other instance from inside one of them over the
#                          overlay, across hosts
#   scripts/demo.sh stop   delete the app, remove the lab (`sigmad lab down`), stop a leftover
#                          `sigmad dev` demo of older versions, and check nothing is left
#
# Running it again reuses the lab and the app. Every wait is bounded.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

LAB=sigma
HOSTS=3
SIGMAD=$root/.venv/bin/sigmad
SIGMACTL=$root/.venv/bin/sigmactl
PY=$root/.venv/bin/python
APP_FILE=examples/lab-web.yaml
APP=web
NAMESPACE=default
# The image ref written in $APP_FILE; replaced by the one the lab reports.
FILE_IMAGE=10.77.0.1:5000/sigma/busybox:latest
LAB_UP_TIMEOUT=300
LAB_DOWN_TIMEOUT=300
RUNNING_TIMEOUT=120
DELETE_TIMEOUT=60

# The demo of earlier versions (`sigmad dev` + a dockerd), stopped by `stop` if still running.
OLD_DEMO_DIR=${HOME}/.sigma/demo
OLD_DOCKERD_PID=$OLD_DEMO_DIR/dockerd.pid
OLD_SIGMAD_PID=$OLD_DEMO_DIR/sigmad.pid

if [[ -t 1 ]]; then
  say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
else
  say() { printf '==> %s\n' "$*"; }
fi
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d /tmp/sigma-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
STATUS=$work/status.json

# Small JSON/YAML helpers (the venv's python has yaml); see `helper CMD ARGS`.
HELPER=$(cat <<'PYEOF'
import json, sys
import yaml

def load(path):
    with open(path) as f:
        data = json.load(f)
    return data.get("items", data) if isinstance(data, dict) and "items" in data else data

cmd, args = sys.argv[1], sys.argv[2:]

if cmd == "field":                      # field STATUS KEY: a top-level value of the lab status
    print(load(args[0]).get(args[1]) or "")

elif cmd == "health":                   # health STATUS: what is wrong with the lab, one per line
    s = load(args[0])
    name = s.get("name", "sigma")
    problems = []
    if not s.get("ready"):
        problems.append(f"the lab was not fully built: remove it with 'make demo-stop' "
                        f"(or 'sigmad lab down --name {name}') and run 'make demo' again")
    for h in s.get("hosts", []):
        if h.get("state") != "up":
            problems.append(f"host {h['name']} is {h['state']}: run 'sigmad lab heal {h['name']}'")
        elif not h.get("engine"):
            problems.append(f"the dockerd of {h['name']} does not answer ({h['engine_url']}): "
                            f"see {s['dir']}/{h['name']}/dockerd.log; 'make demo-stop' then "
                            "'make demo' rebuilds the lab")
        elif not h.get("agent"):
            problems.append(f"the agent of {h['name']} is not running: run "
                            f"'sigmad lab restart-agent {h['name']}' "
                            f"(log {s['dir']}/{h['name']}/node.log)")
    if not (s.get("etcd") or {}).get("alive"):
        problems.append("etcd is not running: 'make demo-stop' then 'make demo' rebuilds the lab")
    if not (s.get("registry") or {}).get("answers"):
        problems.append(f"the registry does not answer (log {s['dir']}/registry.log): "
                        "'make demo-stop' then 'make demo' rebuilds the lab")
    if not any(m.get("healthy") for m in s.get("masters", [])):
        problems.append(f"the master does not answer (log {s['dir']}/master.log): "
                        "'make demo-stop' then 'make demo' rebuilds the lab")
    if not s.get("image"):
        problems.append("the lab has no image: 'make demo-stop' then 'make demo' rebuilds it")
    print("\n".join(problems))

elif cmd == "replicas":                 # replicas FILE APP
    docs = [d for d in yaml.safe_load_all(open(args[0])) if d]
    print(next(d for d in docs if d.get("app") == args[1]).get("replicas", 1))

elif cmd == "template":                 # template OLD_APP NEW_APP: the generation to wait for
    # A change beyond replicas and resources replaces every instance's containers: the
    # instances then show the app's new generation once replaced (they stay Running meanwhile).
    def shape(path):
        try:
            spec = json.load(open(path))["spec"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        spec.pop("replicas", None)
        for c in spec.get("containers", []):
            c.pop("resources", None)
        return spec
    old, new = shape(args[0]), shape(args[1])
    print(json.load(open(args[1]))["generation"] if old is not None and old != new else "")

elif cmd == "progress":   # progress INSTANCES APP NS REPLICAS GENERATION: exit 0 when done
    app, ns, replicas, gen = args[1], args[2], int(args[3]), args[4]
    mine = sorted((i for i in load(args[0])
                   if i.get("app") == app and i.get("namespace", "default") == ns),
                  key=lambda i: i.get("index", 0))
    old = [i for i in mine if gen and str(i.get("generation")) != gen]
    running = [i for i in mine if i.get("state") == "Running" and i not in old]
    def show(i):
        where = f" on {i['node']}" if i.get("node") else ""
        why = f" ({i['reason']})" if i.get("reason") else ""
        return f"{i['name']} {i['state']}{where}{' (old generation)' if i in old else ''}{why}"
    print(f"{len(running)}/{replicas} Running: " + (", ".join(map(show, mine)) or "no instances yet"))
    sys.exit(0 if len(mine) == replicas and len(running) == replicas else 1)

elif cmd == "fetches":                  # fetches STATUS INSTANCES APP: one line per fetch to make
    engines = {h["name"]: h["engine_url"] for h in load(args[0])["hosts"]}
    mine = sorted((i for i in load(args[1]) if i.get("app") == args[2]
                   and i.get("state") == "Running" and i.get("ip") and i.get("containers")),
                  key=lambda i: i.get("index", 0))
    if len(mine) < 2:
        sys.exit(f"only {len(mine)} Running instance(s) with an IP: nothing to fetch")
    src = mine[0]
    for dst in mine[1:]:
        print("\t".join([src["name"], src["node"], src["ip"], engines[src["node"]],
                         src["containers"][0]["id"], dst["name"], dst["node"], dst["ip"]]))

elif cmd == "creds":                    # creds SERVER: 0 if ~/.sigma/credentials.json names it
    import os, pathlib
    path = pathlib.Path(os.environ.get("SIGMA_CREDENTIALS",
                                       pathlib.Path.home() / ".sigma" / "credentials.json"))
    try:
        ok = json.loads(path.read_text()).get("server") == args[0]
    except (OSError, ValueError, AttributeError):
        ok = False
    sys.exit(0 if ok else 1)
PYEOF
)
helper() { "$PY" -c "$HELPER" "$@"; }

need_root() {
  [[ $(id -u) -eq 0 ]] || die "the demo builds a lab of network namespaces, links and dockerds: \
run it as root (sudo make ${1:-demo})"
}

need_venv() {
  [[ -x $SIGMAD && -x $SIGMACTL ]] || die "$SIGMAD is missing: run 'make deps' (or 'make demo')"
}

# Writes the lab's status to $STATUS. Returns 1 if there is no lab, 2 (with the message on
# stderr) if the status failed otherwise.
lab_status() {
  local err=$work/status.err
  if timeout 30 "$SIGMAD" lab status --name "$LAB" -o json >"$STATUS" 2>"$err"; then
    return 0
  fi
  if grep -q "there is no lab" "$err"; then
    return 1
  fi
  cat "$err" >&2
  return 2
}

ensure_lab() {
  local found=0
  lab_status || found=$?
  if ((found == 2)); then
    die "'sigmad lab status --name $LAB' failed (above): fix that, or remove the lab with \
'make demo-stop'"
  fi
  if ((found == 0)); then
    say "lab $LAB exists: checking it"
    local problems line
    problems=$(helper health "$STATUS")
    if [[ -n $problems ]]; then
      "$SIGMAD" lab status --name "$LAB" >&2 || true
      printf '\nthe lab %s is not healthy:\n' "$LAB" >&2
      while IFS= read -r line; do echo "  - $line"; done <<<"$problems" >&2
      die "fix the above and run 'make demo' again"
    fi
    echo "lab $LAB is healthy: reusing it ('make demo-stop' removes it)"
    return
  fi
  say "building lab $LAB: sigmad lab up --hosts $HOSTS (up to ${LAB_UP_TIMEOUT}s)"
  local started=$SECONDS rc=0
  timeout --foreground -k 15 "$LAB_UP_TIMEOUT" "$SIGMAD" --log-level WARNING lab up --name "$LAB" \
    --hosts "$HOSTS" || rc=$?
  if ((rc == 124)); then
    die "'sigmad lab up' did not finish within ${LAB_UP_TIMEOUT}s: its logs are in \
/var/lib/sigma-lab/$LAB; remove what it made with 'make demo-stop'"
  elif ((rc != 0)); then
    die "'sigmad lab up' failed (its message is above): fix that, run 'make demo-stop' if it \
says the lab is half built, then 'make demo' again"
  fi
  echo "lab built in $((SECONDS - started))s"
  lab_status || die "the lab was built but 'sigmad lab status' does not find it"
}

# Sets SERVER, IMAGE, LAB_DIR and exports SIGMA_SERVER/SIGMA_TOKEN/SIGMA_CA, so sigmactl talks to the lab
# whatever ~/.sigma/credentials.json says.
use_lab() {
  SERVER=$(helper field "$STATUS" server)
  IMAGE=$(helper field "$STATUS" image)
  LAB_DIR=$(helper field "$STATUS" dir)
  [[ -n $SERVER && -n $LAB_DIR ]] || die "the lab status lacks its server or directory: run \
'make demo-stop' and 'make demo' again"
  [[ -r $LAB_DIR/token ]] || die "cannot read the lab's token $LAB_DIR/token"
  export SIGMA_SERVER=$SERVER
  SIGMA_TOKEN=$(<"$LAB_DIR/token")
  export SIGMA_TOKEN
  SIGMA_CA=$(helper field "$STATUS" ca)  # the lab's CA: its API is HTTPS ("" with --no-tls)
  export SIGMA_CA
  echo "server $SERVER, image $IMAGE"
}

apply_app() {
  say "sigmactl apply -f $APP_FILE (image $IMAGE)"
  [[ -f $APP_FILE ]] || die "$APP_FILE is missing"
  sed "s#$FILE_IMAGE#$IMAGE#g" "$APP_FILE" >"$work/app.yaml"
  grep -q "image: $IMAGE" "$work/app.yaml" || die "$APP_FILE has no 'image: $FILE_IMAGE' to \
replace with the lab's image"
  timeout 20 "$SIGMACTL" describe app "$APP" -n "$NAMESPACE" -o json >"$work/old-app.json" \
    2>/dev/null || true
  timeout 60 "$SIGMACTL" apply -f "$work/app.yaml"
  timeout 20 "$SIGMACTL" describe app "$APP" -n "$NAMESPACE" -o json >"$work/new-app.json"
  # Set when the apply replaces the containers of the app's instances.
  WANT_GENERATION=$(helper template "$work/old-app.json" "$work/new-app.json")
  if [[ -n $WANT_GENERATION ]]; then
    echo "the containers of $APP are replaced (generation $WANT_GENERATION)"
  fi
}

wait_running() {
  local replicas deadline last="" line shown_at=$SECONDS start=$SECONDS
  replicas=$(helper replicas "$APP_FILE" "$APP")
  say "waiting (up to ${RUNNING_TIMEOUT}s) for the $replicas instances of $APP to be Running"
  deadline=$((SECONDS + RUNNING_TIMEOUT))
  while true; do
    if timeout 20 "$SIGMACTL" get instances -n "$NAMESPACE" --app "$APP" -o json \
      >"$work/instances.json" 2>"$work/ctl.err"; then
      if line=$(helper progress "$work/instances.json" "$APP" "$NAMESPACE" "$replicas" \
        "${WANT_GENERATION:-}"); then
        echo "  [$((SECONDS - start))s] $line"
        return
      fi
    else
      line="sigmactl: $(head -n 1 "$work/ctl.err")"
    fi
    # A line when something changed, and at least every 10 s.
    if [[ $line != "$last" ]] || ((SECONDS - shown_at >= 10)); then
      echo "  [$((SECONDS - start))s] $line"
      last=$line
      shown_at=$SECONDS
    fi
    if ((SECONDS >= deadline)); then
      "$SIGMACTL" get instances -o wide || true
      die "the instances of $APP were not all Running within ${RUNNING_TIMEOUT}s: see \
'sigmactl why $APP-N' for a Pending one, 'sigmactl events --app $APP', the master log \
$LAB_DIR/master.log and 'sigmad lab status'"
    fi
    sleep 2
  done
}

show_instances() {
  say "sigmactl get instances -o wide"
  timeout 20 "$SIGMACTL" get instances -n "$NAMESPACE" --app "$APP" -o wide
}

# From inside the first instance, fetch every other one by its overlay IP.
cross_host() {
  timeout 20 "$SIGMACTL" get instances -n "$NAMESPACE" --app "$APP" -o json >"$work/instances.json"
  helper fetches "$STATUS" "$work/instances.json" "$APP" >"$work/fetches.tsv" ||
    die "no instances of $APP to fetch from: see 'sigmactl get instances -o wide'"
  local src src_node src_ip engine cid dst dst_node dst_ip answer ok=0 cross=0 failed=0 total=0
  read -r src src_node src_ip _ <"$work/fetches.tsv"
  say "from inside $src (on $src_node): wget http://<overlay IP>:8080 of every other instance"
  while IFS=$'\t' read -r src src_node src_ip engine cid dst dst_node dst_ip; do
    total=$((total + 1))
    answer=""
    for ((try = 1; try <= 3; try++)); do
      answer=$(timeout 10 docker -H "$engine" exec "$cid" timeout 3 wget -qO- \
        "http://$dst_ip:8080/" 2>/dev/null </dev/null) && [[ -n $answer ]] && break
      answer=""
      sleep 1
    done
    if [[ $answer == "hello from $dst" ]]; then
      echo "  $src ($src_node, $src_ip) → $dst ($dst_node, $dst_ip): $answer"
      ok=$((ok + 1))
      [[ $src_node != "$dst_node" ]] && cross=$((cross + 1))
    else
      echo "  $src ($src_node, $src_ip) → $dst ($dst_node, $dst_ip): FAILED" \
        "(${answer:-no answer after 3 tries})"
      failed=$((failed + 1))
    fi
  done <"$work/fetches.tsv"
  echo "  $ok/$total answered, $cross of them from another host"
  ((failed == 0)) || die "$failed fetch(es) failed: check 'sigmad lab status' and the agents' \
logs $LAB_DIR/hN/node.log; 'make demo-stop' then 'make demo' rebuilds the lab"
  ((cross > 0)) || echo "note: the others all run on $src_node too: nothing crossed hosts"
}

hints() {
  say "sigmactl pool"
  timeout 20 "$SIGMACTL" pool
  local creds_note=""
  if ! helper creds "$SERVER"; then
    creds_note="
Note: ~/.sigma/credentials.json does not point at the lab ($SERVER); for sigmactl run first:
  export SIGMA_SERVER=$SERVER SIGMA_TOKEN=\$(cat $LAB_DIR/token)"
  fi
  cat <<EOF

The demo is up: $APP runs $(helper replicas "$APP_FILE" "$APP") replicas on the lab's hosts.
Try next (first: export PATH=$root/.venv/bin:\$PATH):
  sigmactl get nodes -o wide          # h1..h$HOSTS with their zone and host labels
  sigmactl get instances -o wide      # node and overlay IP of each instance
  sigmad lab status                   # hosts, engines, agents, etcd, registry, master
  sigmad lab kill-host h2             # power loss: h2 goes NotReady, its instances move (same IPs)
  sigmactl events --app web           # what happened, with reasons
  sigmad lab heal h2                  # h2's dockerd and agent come back
  make demo-stop                      # delete $APP and remove the lab (or: sigmad lab down)$creds_note
EOF
}

start() {
  need_root demo
  need_venv
  command -v docker >/dev/null || die "the docker client is missing: run 'make deps'"
  if running_pid "$OLD_SIGMAD_PID" sigmad; then
    echo "note: the demo of an earlier version (sigmad dev, pid $(<"$OLD_SIGMAD_PID")) still" \
      "runs; 'make demo-stop' stops it too"
  fi
  local started=$SECONDS
  ensure_lab
  use_lab
  apply_app
  wait_running
  show_instances
  cross_host
  hints
  echo "(make demo took $((SECONDS - started))s)"
}

# -- stop ------------------------------------------------------------------------------------

# True if the pid in file $1 is alive and its command line mentions $2.
running_pid() {
  local file=$1 what=$2 pid cmdline
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$what"* ]]
}

# Send SIGTERM to the pid in file $1 (if it is $2), wait up to $3 seconds, then SIGKILL.
stop_pid() {
  local file=$1 what=$2 wait_s=$3 pid i
  if ! running_pid "$file" "$what"; then
    rm -f "$file"
    return 1
  fi
  pid=$(<"$file")
  say "stopping the earlier demo's $what (pid $pid)"
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

# Prints what of lab $LAB (directory $1) is left on this machine; returns 1 if anything is.
leftovers() {
  local dir=$1 found="" line
  found+=$(ip netns list 2>/dev/null | grep -E "^$LAB-h[0-9]+( |$)" | sed 's/^/netns /' || true)
  found+=$'\n'$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
    grep -E "^$LAB-(br|h[0-9]+)$" | sed 's/^/link /' || true)
  found+=$'\n'$(pgrep -af -- "$dir/|/run/sigma-lab/$LAB-h" | grep -v -- "pgrep" |
    sed 's/^/process /' || true)
  found+=$'\n'$(awk -v d="$dir/" -v r="/run/sigma-lab/$LAB-h" \
    'index($2, d) == 1 || index($2, r) == 1 {print "mount " $2}' /proc/mounts || true)
  found+=$'\n'$(iptables -S FORWARD 2>/dev/null | grep -- "sigma-lab-$LAB\"\\? " |
    sed 's/^/iptables /' || true)
  found+=$'\n'$(find /sys/fs/cgroup -maxdepth 2 -type d -name "sigma-lab-$LAB-h*" 2>/dev/null |
    grep -E "/sigma-lab-$LAB-h[0-9]+$" | sed 's/^/cgroup /' || true)
  [[ -e $dir ]] && found+=$'\n'"directory $dir"
  found=$(grep -v '^$' <<<"$found" || true)
  if [[ -n $found ]]; then
    while IFS= read -r line; do echo "  $line"; done <<<"$found"
    return 1
  fi
}

stop() {
  local dir=/var/lib/sigma-lab/$LAB
  if [[ $(id -u) -eq 0 && -x $SIGMAD ]]; then
    local found=0
    lab_status || found=$?
    if ((found == 0)); then
      dir=$(helper field "$STATUS" dir)
      if [[ -z $(helper health "$STATUS" | grep "master does not answer" || true) ]]; then
        use_lab >/dev/null
        say "sigmactl delete app $APP --wait (up to ${DELETE_TIMEOUT}s)"
        local out rc=0
        out=$(timeout $((DELETE_TIMEOUT + 15)) "$SIGMACTL" delete app "$APP" -n "$NAMESPACE" \
          --wait --timeout "$DELETE_TIMEOUT" 2>&1) || rc=$?
        if ((rc == 0)); then
          echo "$out"
        elif grep -q "not found" <<<"$out"; then
          echo "app $NAMESPACE/$APP: not there"
        else
          echo "$out"
          echo "the delete did not finish: going on ('sigmad lab down' stops every container)"
        fi
      else
        echo "the lab's master does not answer: skipping the delete ('sigmad lab down' stops" \
          "every container)"
      fi
      say "sigmad lab down (up to ${LAB_DOWN_TIMEOUT}s)"
      local started=$SECONDS rc=0
      timeout --foreground -k 15 "$LAB_DOWN_TIMEOUT" "$SIGMAD" lab down --name "$LAB" || rc=$?
      ((rc == 0)) || die "'sigmad lab down' failed or timed out (above): run 'make demo-stop' \
again; 'sigmad lab status' shows what is left"
      echo "lab removed in $((SECONDS - started))s"
    elif ((found == 2)); then
      say "sigmad lab down (its status failed: removing what lab.json records)"
      timeout --foreground -k 15 "$LAB_DOWN_TIMEOUT" "$SIGMAD" lab down --name "$LAB" ||
        die "'sigmad lab down' failed (above): fix what it says, then run 'make demo-stop' again"
    else
      echo "there is no lab named $LAB"
    fi
  elif [[ -e /run/sigma-lab/$LAB.dir || -e $dir ]]; then
    need_root demo-stop
    need_venv
  fi
  stop_pid "$OLD_SIGMAD_PID" sigmad 30 || true
  stop_pid "$OLD_DOCKERD_PID" dockerd 30 || true
  if [[ $(id -u) -eq 0 ]]; then
    say "checking that nothing of lab $LAB is left"
    leftovers "$dir" || die "the above is left of lab $LAB: run 'make demo-stop' again"
    echo "nothing left: no netns, link, process, mount, firewall rule or directory of lab $LAB"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
