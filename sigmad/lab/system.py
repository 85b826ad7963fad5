"""Small, bounded helpers over /proc, mounts, cgroups and commands (Linux only)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path

from sigmad.lab.config import LabError

CGROUP_ROOT = Path("/sys/fs/cgroup")


def run(args: list[str], timeout: float = 30.0, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command; with `check`, a failure raises LabError with its stderr."""
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                                check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"`{' '.join(args)}` did not finish in {timeout:.0f}s") from None
    except FileNotFoundError:
        raise LabError(f"`{args[0]}` is not installed") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise LabError(f"`{' '.join(args)}` failed: {detail[-1] if detail else result.returncode}")
    return result


def spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start a detached process (own session) logging to `log`; its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc.pid


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not count)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _mentions(args: list[str], paths: Iterable[str]) -> bool:
    text = "\0".join(args)
    return any(re.search(re.escape(p) + r"(/|\x00|$)", text) for p in paths)


def owned(pid: int, marker: str) -> bool:
    """`pid` runs and its command line mentions `marker` (guards against pid reuse)."""
    return alive(pid) and _mentions(cmdline(pid), [marker])


def _all_pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def protected() -> set[int]:
    """This process and its ancestors: never signalled."""
    pids, pid = set(), os.getpid()
    for _ in range(64):
        if pid <= 1 or pid in pids:
            break
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids | {1}


def pids_mentioning(paths: Iterable[str]) -> set[int]:
    """Live processes whose command line names one of `paths` (or something under it)."""
    paths = [p for p in paths if p]
    skip = protected()
    return {pid for pid in _all_pids()
            if pid not in skip and alive(pid) and _mentions(cmdline(pid), paths)}


def pids_in_cgroup(component: str) -> set[int]:
    """Live processes in a cgroup whose path has the directory `component` (any hierarchy)."""
    found = set()
    skip = protected()
    for pid in _all_pids():
        try:
            lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(":", 2)[-1].split("/")
            if component in parts or f"{component}.slice" in parts:
                if pid not in skip and alive(pid):
                    found.add(pid)
                break
    return found


def pids_in_netns(netns: str) -> set[int]:
    result = run(["ip", "netns", "pids", netns], check=False, timeout=10)
    skip = protected()
    return {int(p) for p in result.stdout.split() if p.isdigit() and int(p) not in skip}


def send(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait (bounded) until none of `pids` runs; those still running."""
    left = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in left if alive(pid)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def stop(pids: Iterable[int], timeout: float) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL what is left (and wait a little)."""
    pids = {p for p in pids if p > 0}
    send(pids, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    if left:
        send(left, signal.SIGKILL)
        wait_gone(left, 5)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(roots: Iterable[str]) -> list[str]:
    """Mount points below `roots` (not a root itself: it may have been one before), deepest
    first."""
    roots = [r.rstrip("/") for r in roots if r]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if any(point.startswith(r + "/") for r in roots):
            points.append(point)
    return sorted(points, key=lambda p: (p.count("/"), len(p)), reverse=True)


def unmount_under(roots: Iterable[str], rounds: int = 4) -> list[str]:
    """Unmount everything under `roots` (`umount -l` as a fall-back); what remains."""
    roots = list(roots)
    for _ in range(rounds):
        points = mounts_under(roots)
        if not points:
            return []
        for point in points:
            if run(["umount", point], check=False, timeout=15).returncode != 0:
                run(["umount", "-l", point], check=False, timeout=15)
    return mounts_under(roots)


def attach_loop(file: Path, size: int) -> str:
    """A sparse file of `size` bytes (made if absent) on a new loop device: its path."""
    with open(file, "ab") as f:
        f.truncate(size)
    return run(["losetup", "--find", "--show", str(file)]).stdout.strip()


def loop_backing(device: str) -> str:
    """The file behind loop device `device` ("" if it is not attached)."""
    try:
        text = (Path("/sys/class/block") / Path(device).name / "loop" / "backing_file") \
            .read_text().strip()
    except OSError:
        return ""
    return text.removesuffix(" (deleted)")


def detach_loop(device: str, file: str) -> str:
    """Detach `device` if it still carries `file` (a loop number may have been reused by
    someone else); a problem in words, or ""."""
    if not device or os.path.realpath(loop_backing(device) or "/") != os.path.realpath(file):
        return ""
    result = run(["losetup", "--detach", device], check=False, timeout=15)
    return f"loop device {device} ({file}) remains: {result.stderr.strip()}" \
        if result.returncode else ""


CFS_PERIOD_US = 100_000


def own_cgroups(text: str | None = None) -> dict[str, str]:
    """Hierarchy (its mount's name: "cpu", "cpu,cpuacct", "memory"; "" on v2) → this
    process's cgroup in it, from /proc/self/cgroup (or `text`)."""
    if text is None:
        text = Path("/proc/self/cgroup").read_text()
    out = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            out[parts[1]] = parts[2]
    return out


def _under(root: Path, hierarchy: str, own: str, component: str) -> Path:
    return root.joinpath(hierarchy, own.lstrip("/"), component) if hierarchy else \
        root.joinpath(own.lstrip("/"), component)


def cgroup_dirs(component: str, root: Path = CGROUP_ROOT,
                own: dict[str, str] | None = None) -> dict[str, Path]:
    """Where a dockerd started by this process puts --cgroup-parent `component` (relative
    to its own cgroup, as runc does): controller ("cpu", "memory"; "" on v2) → directory."""
    own = own_cgroups() if own is None else own
    if (root / "cgroup.controllers").exists():
        return {"": _under(root, "", own.get("", "/"), component)}
    dirs: dict[str, Path] = {}
    for hierarchy, path in own.items():
        for controller in ("cpu", "memory"):
            if controller in hierarchy.split(","):
                dirs[controller] = _under(root, hierarchy, path, component)
    return dirs


def cap_cgroup(component: str, cpu_m: int, memory: int, root: Path = CGROUP_ROOT,
               own: dict[str, str] | None = None) -> list[Path]:
    """Make cgroup `component` (a dockerd's --cgroup-parent) capped at `cpu_m` millicores
    (CFS quota) and `memory` bytes, on cgroup v2 (one tree) or v1 (the cpu and memory
    hierarchies); the directories made or capped."""
    dirs = cgroup_dirs(component, root, own)
    quota = cpu_m * CFS_PERIOD_US // 1000
    if "" in dirs:  # v2: the parent must hand both controllers down
        top = dirs[""]
        with contextlib.suppress(OSError):
            (top.parent / "cgroup.subtree_control").write_text("+cpu +memory")
        top.mkdir(exist_ok=True)
        (top / "cpu.max").write_text(f"{quota} {CFS_PERIOD_US}")
        (top / "memory.max").write_text(str(memory))
        return [top]
    if set(dirs) != {"cpu", "memory"}:
        raise OSError(f"no cpu and memory cgroup hierarchies under {root}")
    cpu, mem = dirs["cpu"], dirs["memory"]
    for d in (cpu, mem):
        d.mkdir(exist_ok=True)
    (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
    (cpu / "cpu.cfs_quota_us").write_text(str(quota))
    (mem / "memory.limit_in_bytes").write_text(str(memory))
    return [cpu, mem]


def machine_capacity() -> tuple[int, int]:
    """(millicores, bytes of memory) of this machine."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    return (os.cpu_count() or 1) * 1000, total


def remove_cgroups(component: str, made: Iterable[str] = ()) -> list[str]:
    """rmdir the cgroup `component` (and its children) in every hierarchy, at the top and
    under this process's own cgroup (where runc puts a relative cgroup parent), and the
    directories `made` (where `up` capped it, maybe under another process's cgroup); what
    remains."""
    left = []
    own = own_cgroups()
    nested = {_under(CGROUP_ROOT, h, p, component) for h, p in own.items() if h and p != "/"}
    for top in sorted({*CGROUP_ROOT.glob(f"*/{component}"), *nested, *map(Path, made)}):
        if not top.is_dir():
            continue
        for dirpath, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError:
                left.append(dirpath)
    return left


def http_get(url: str, headers: dict[str, str] | None = None,
             timeout: float = 3.0, ca: str = "") -> tuple[int, bytes] | None:
    """(status, body) of a GET, or None when nothing answers; an https:// server is
    verified against the CA file `ca`."""
    req = urllib.request.Request(url, headers=headers or {})
    context = ssl.create_default_context(cafile=ca) if ca and url.startswith("https:") \
        else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, ValueError):
        return None


def port_free(host: str, port: int) -> bool:
    """Whether a TCP listener could bind `host`:`port` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def engine_ping(sock: str, timeout: float = 2.0) -> bool:
    """Whether the Docker engine on unix socket `sock` answers /_ping."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock)
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            return b" 200 " in s.recv(64)
    except OSError:
        return False


def tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
