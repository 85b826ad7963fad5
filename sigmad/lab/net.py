"""The lab's underlay: a bridge in the root namespace, a netns + veth pair per host, and the
root-namespace FORWARD rule that lets bridged traffic through."""

from __future__ import annotations

import ipaddress
import shutil
from pathlib import Path

from sigmad.lab.system import run

NETNS_DIR = Path("/var/run/netns")


def link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def link_is_up(name: str) -> bool:
    try:
        flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
    except (OSError, ValueError):
        return False
    return bool(flags & 1)  # IFF_UP


def addresses_in(subnet: str) -> list[str]:
    """Interfaces of the root namespace holding an address inside `subnet`."""
    net = ipaddress.IPv4Network(subnet)
    found = []
    for line in run(["ip", "-o", "-4", "addr", "show"], timeout=10).stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            iface = ipaddress.IPv4Interface(parts[parts.index("inet") + 1])
            if iface.network.overlaps(net):
                found.append(f"{parts[1]} {iface}")
    return found


def inside(netns: str) -> list[str]:
    """The command prefix that runs something in `netns` (nsenter keeps /sys and cgroups)."""
    return ["nsenter", f"--net={NETNS_DIR / netns}"]


def create_bridge(name: str, address: str) -> None:
    """`address` is CIDR-style, e.g. 10.77.0.1/24."""
    run(["ip", "link", "add", name, "type", "bridge"])
    run(["ip", "addr", "add", address, "dev", name])
    run(["ip", "link", "set", name, "up"])


def create_host(netns: str, veth: str, bridge: str, address: str, gateway: str) -> None:
    """A netns with lo up and eth0 (`address`, CIDR-style) on a veth whose root side `veth`
    is a port of `bridge`; default route via `gateway`."""
    run(["ip", "netns", "add", netns])
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns])
    run(["ip", "link", "set", veth, "master", bridge])
    run(["ip", "link", "set", veth, "up"])
    ns = inside(netns)
    run([*ns, "ip", "link", "set", "lo", "up"])
    run([*ns, "ip", "addr", "add", address, "dev", "eth0"])
    run([*ns, "ip", "link", "set", "eth0", "up"])
    run([*ns, "ip", "route", "add", "default", "via", gateway])


def set_link(name: str, up: bool) -> None:
    run(["ip", "link", "set", name, "up" if up else "down"])


def delete_link(name: str) -> str | None:
    """Delete a link if it exists; a problem in words, or None."""
    if not link_exists(name):
        return None
    result = run(["ip", "link", "del", name], check=False, timeout=15)
    return None if result.returncode == 0 else f"ip link del {name}: {result.stderr.strip()}"


def delete_netns(name: str) -> str | None:
    if not netns_exists(name):
        return None
    result = run(["ip", "netns", "del", name], check=False, timeout=15)
    return None if result.returncode == 0 else f"ip netns del {name}: {result.stderr.strip()}"


def have_iptables() -> bool:
    return shutil.which("iptables") is not None


def forward_rule(bridge: str, comment: str) -> list[str]:
    """The args after `iptables -I`/`-D`: accept traffic bridged between the lab's ports."""
    return ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT",
            "-m", "comment", "--comment", comment]


def add_rule(rule: list[str]) -> None:
    run(["iptables", "-w", "10", "-I", *rule])


def rule_present(rule: list[str]) -> bool:
    return run(["iptables", "-w", "10", "-C", *rule], check=False, timeout=15).returncode == 0


def delete_rule(rule: list[str]) -> str | None:
    """Delete every copy of `rule` (bounded); a problem in words, or None."""
    for _ in range(5):
        if not rule_present(rule):
            return None
        result = run(["iptables", "-w", "10", "-D", *rule], check=False, timeout=15)
        if result.returncode != 0:
            return f"iptables -D {' '.join(rule)}: {result.stderr.strip()}"
    return None
