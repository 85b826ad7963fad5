"""Taking a lab apart: `kill-host` and `down`."""

from __future__ import annotations

import contextlib
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sigmactl import contexts
from sigmad.lab import net, system
from sigmad.lab.config import LAB_ROOT, RUN_ROOT
from sigmad.lab.state import STATE_FILE, HostState, LabState, lab_context, pointer, span

Say = Callable[[str], None]


def kill_host_processes(host: HostState) -> set[int]:
    """SIGKILL the host's agent, dockerd, containerd, shims and container processes."""
    killed: set[int] = set()
    for _ in range(4):
        pids = system.pids_mentioning([host.exec_root, host.root])
        pids |= system.pids_in_cgroup(host.cgroup_parent)
        pids |= system.pids_in_netns(host.netns) if net.netns_exists(host.netns) else set()
        pids |= {p for p, mark in ((host.agent_pid, host.node_config),
                                   (host.dockerd_pid, host.exec_root))
                 if system.owned(p, mark)}
        if not pids:
            break
        system.send(pids, signal.SIGKILL)
        system.wait_gone(pids, 3)
        killed |= pids
    return killed


def remove_stale_pidfiles(host: HostState) -> None:
    """Remove the pid files of the host's dockerd and containerd whose process is gone."""
    for path in (Path(host.root) / "dockerd.pid",
                 Path(host.exec_root) / "containerd" / "containerd.pid"):
        try:
            pid = int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            continue
        if not system.alive(pid):
            path.unlink(missing_ok=True)


def stop_processes(s: LabState, say: Say) -> None:
    """Masters and agents, then dockerds (SIGTERM, 20 s, then like kill-host), registry, etcd."""
    say("stopping masters and agents")
    system.stop([m.pid for m in s.masters if system.owned(m.pid, m.config)], 10)
    system.stop([h.agent_pid for h in s.hosts if system.owned(h.agent_pid, h.node_config)],
                10)
    engines = [h.dockerd_pid for h in s.hosts if system.owned(h.dockerd_pid, h.exec_root)]
    if engines:
        say(f"stopping dockerd on {span(s.hosts)}")
        system.send(engines, signal.SIGTERM)
        system.wait_gone(engines, 20)
    for host in s.hosts:
        kill_host_processes(host)
    say("stopping registry and etcd")
    if s.registry and system.owned(s.registry.pid, s.registry.config):
        system.stop([s.registry.pid], 10)
    if s.etcd and system.owned(s.etcd.pid, s.etcd.data_dir):
        system.stop([s.etcd.pid], 10)


def remove_system_objects(s: LabState, say: Say) -> list[str]:
    """Mounts, loop devices, veths, netns, the bridge, the iptables rule, cgroups; problems
    in words."""
    problems = [f"mount {p} remains" for p in
                system.unmount_under([s.dir, *(h.exec_root for h in s.hosts)])]
    for host in s.hosts:
        problems += filter(None, [system.detach_loop(d.device, d.file) for d in host.ssds])
    say("removing links, namespaces, bridge, iptables rule and cgroups")
    for host in s.hosts:
        problems += filter(None, [net.delete_link(host.veth), net.delete_netns(host.netns)])
    if s.bridge:
        problems += filter(None, [net.delete_link(s.bridge)])
    if s.iptables_rule:
        problems += filter(None, [net.delete_rule(s.iptables_rule)])
    for host in s.hosts:
        problems += [f"cgroup {d} remains"
                     for d in system.remove_cgroups(host.cgroup_parent, host.cgroups)]
    return problems


def remove_files(s: LabState) -> list[str]:
    """Credentials `up` wrote, DIR, exec roots (lab.json last, only if all went); problems."""
    problems: list[str] = []

    def note(_func: Any, path: str, exc: Any) -> None:
        problems.append(f"cannot remove {path}: {exc[1] if isinstance(exc, tuple) else exc}")

    if s.credentials and s.token:
        contexts.forget(lab_context(s.name), s.token, Path(s.credentials))
    root = Path(s.dir)
    children = list(root.iterdir()) if root.exists() else []
    for child in children:
        if child.name == STATE_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, onerror=note)
        else:
            child.unlink(missing_ok=True)
    for host in s.hosts:
        if Path(host.exec_root).exists():
            shutil.rmtree(host.exec_root, onerror=note)
    if problems:
        return problems
    (root / STATE_FILE).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # kept if it is a mount point (it was before `up`)
        root.rmdir()
    try:
        if Path(pointer(s.name).read_text().strip()) == root:
            pointer(s.name).unlink()
    except OSError:
        pass
    for parent in (RUN_ROOT, LAB_ROOT):
        if parent.exists() and not any(parent.iterdir()):
            parent.rmdir()
    return problems
