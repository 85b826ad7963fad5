#!/usr/bin/env bash
# Install sigma on this host (Debian 12): a venv under PREFIX with the wheel `make dist` built
# (its dependencies pinned by requirements.lock), sigmad and sigmactl linked into BIN_DIR, the
# systemd units into UNIT_DIR and the example configs into ETC_DIR. Run it again with a newer
# wheel to upgrade: the configs you edited are kept, the units and the venv are replaced.
#
#   scripts/install.sh [--prefix /opt/sigma] [--bin-dir /usr/local/bin] [--etc-dir /etc/sigma]
#                      [--unit-dir /etc/systemd/system] [--wheel dist/sigma_orchestrator-*.whl]
#                      [--lock requirements.lock] [--pip-args "--no-index --find-links DIR"]
#                      [--enable master] [--enable node]
#
# --enable UNIT enables and starts sigmad-UNIT only if systemd runs here and
# `sigmad UNIT --check` passes with its config; otherwise it says what to do and enables
# nothing. See docs/operations.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
prefix=/opt/sigma
bin_dir=/usr/local/bin
etc_dir=/etc/sigma
unit_dir=/etc/systemd/system
wheel=""
lock="$here/requirements.lock"
pip_args=""
enable=()

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "==> $*"; }

while (($#)); do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --bin-dir) bin_dir=$2; shift 2 ;;
    --etc-dir) etc_dir=$2; shift 2 ;;
    --unit-dir) unit_dir=$2; shift 2 ;;
    --wheel) wheel=$2; shift 2 ;;
    --lock) lock=$2; shift 2 ;;
    --pip-args) pip_args=$2; shift 2 ;;
    --enable)
      [[ $2 == master || $2 == node ]] || die "--enable $2: use master or node"
      enable+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

if [[ -z $wheel ]]; then
  wheel=$(ls -t "$here"/dist/sigma_orchestrator-*.whl 2>/dev/null | head -1 || true)
  [[ -n $wheel ]] || die "no wheel in $here/dist: run 'make dist' first, or pass --wheel FILE"
fi
[[ -f $wheel ]] || die "--wheel $wheel: no such file"
[[ -f $lock ]] || die "--lock $lock: no such file (the requirements.lock of the release)"
command -v python3 >/dev/null || die "python3 is missing: apt-get install python3 python3-venv"
python3 -c 'import ensurepip, venv' 2>/dev/null || die "python3-venv is missing: apt-get install python3-venv"

venv="$prefix/venv"
say "venv $venv"
install -d -m 755 "$prefix"
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
# The lock's versions as constraints (its hashes pin the test tools' too; pip takes no hashes
# in a constraints file): the dependencies are the ones CI tested.
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
grep -v -- '--hash' "$lock" | sed -e 's/ *\\$//' > "$constraints"
say "installing $(basename "$wheel") and its dependencies (pinned by $(basename "$lock"))"
# shellcheck disable=SC2086  # pip_args is a list of words
"$venv/bin/pip" install --quiet --disable-pip-version-check $pip_args -c "$constraints" "$wheel"
# (again, alone: a rebuilt wheel of the same version replaces the one installed)
# shellcheck disable=SC2086
"$venv/bin/pip" install --quiet --disable-pip-version-check $pip_args --force-reinstall \
  --no-deps "$wheel"
"$venv/bin/sigmad" --version >/dev/null || die "the installed sigmad does not run"

say "linking sigmad and sigmactl into $bin_dir"
install -d -m 755 "$bin_dir"
for cmd in sigmad sigmactl; do
  ln -sfn "$venv/bin/$cmd" "$bin_dir/$cmd"
done

say "configs in $etc_dir (kept if present)"
install -d -m 750 "$etc_dir"
if [[ ! -e $etc_dir/master.yaml ]]; then
  token=$(python3 -c 'import secrets; print(secrets.token_hex(24))')
  # mode 0600 before the token is in it: it is the cluster's admin token
  install -m 600 /dev/null "$etc_dir/master.yaml"
  sed -e "s/^token: change-me-0123456789abcdef$/token: $token/" "$here/conf/master.yaml" \
    > "$etc_dir/master.yaml"
  echo "    $etc_dir/master.yaml written (mode 600) with a new admin token: edit etcd and listen"
else
  chmod go-rwx "$etc_dir/master.yaml"
fi
if [[ ! -e $etc_dir/node.yaml ]]; then
  install -m 640 "$here/conf/node.yaml" "$etc_dir/node.yaml"
  echo "    $etc_dir/node.yaml written (mode 640): edit name, engine, address and etcd"
fi

say "systemd units in $unit_dir"
install -d -m 755 "$unit_dir"
for unit in master node; do
  sed -e "s#/usr/local/bin/sigmad#$bin_dir/sigmad#" -e "s#/etc/sigma/#$etc_dir/#" \
    "$here/systemd/sigmad-$unit.service" > "$unit_dir/sigmad-$unit.service.tmp"
  chmod 644 "$unit_dir/sigmad-$unit.service.tmp"
  mv "$unit_dir/sigmad-$unit.service.tmp" "$unit_dir/sigmad-$unit.service"
done

running_systemd() { command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; }
if running_systemd && [[ $unit_dir == /etc/systemd/system ]]; then
  systemctl daemon-reload
fi
for unit in "${enable[@]}"; do
  if ! running_systemd || [[ $unit_dir != /etc/systemd/system ]]; then
    echo "    sigmad-$unit not enabled: systemd does not run here (or --unit-dir is not" \
         "/etc/systemd/system); later: systemctl enable --now sigmad-$unit"
    continue
  fi
  if ! "$bin_dir/sigmad" "$unit" --check --config "$etc_dir/$unit.yaml"; then
    echo "    sigmad-$unit not enabled: fix what the check says above, then:" \
         "systemctl enable --now sigmad-$unit"
    continue
  fi
  systemctl enable --now "sigmad-$unit"
  echo "    sigmad-$unit enabled and started"
done
say "done: $("$bin_dir/sigmad" --version)"
