"""Overlay addresses (DESIGN.md §5): the cluster CIDR, MACs derived from IPs, and picking a
free address. Claims are `alloc/ip/{ip}` keys created only if absent (sigmad.controller), so
two instances never hold one IP, even with two masters racing.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

NETWORK = "sigma"  # the Docker network every host's engine has
BRIDGE = "sigma0"  # its bridge device, the same name on every host
VXLAN = "sigma-vx"  # the tunnel device enslaved to the bridge
VNI = 4244
VXLAN_PORT = 4789
MTU = 1450  # 1500 on the underlay minus VXLAN's 50 bytes
RANDOM_TRIES = 64


def mac_for(ip: str) -> str:
    """The MAC of an overlay IP: 0a:58 (locally administered) then the IP's four bytes, so a
    moved instance keeps its MAC and its peers' ARP caches stay right."""
    return "0a:58:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(ip).packed)


@dataclass(frozen=True)
class OverlayNet:
    """The cluster CIDR: its first address is the anycast gateway on every host."""

    cidr: str

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def usable(self, ip: str) -> str:
        """Why `ip` cannot be an instance's address ("" if it can)."""
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            return f"{ip!r} is not an IPv4 address"
        net = self.network
        if addr not in net:
            return f"{ip} is outside the cluster network {net}"
        if addr in (net.network_address, net.broadcast_address) or str(addr) == self.gateway:
            return f"{ip} is reserved in {net} (network, gateway or broadcast address)"
        return ""

    def pick(self, taken: set[str], rng: random.Random | None = None) -> str | None:
        """A free address: random first (racing masters rarely pick the same), then the
        first free one in order; None when the network is full."""
        rng = rng or random.Random()
        net = self.network
        first, size = int(net.network_address) + 2, net.num_addresses - 3
        for _ in range(RANDOM_TRIES):
            ip = str(ipaddress.IPv4Address(first + rng.randrange(size)))
            if ip not in taken:
                return ip
        for n in range(size):
            ip = str(ipaddress.IPv4Address(first + n))
            if ip not in taken:
                return ip
        return None


def choose(net: OverlayNet, fixed: str, current: str, taken: set[str],
           rng: random.Random | None = None) -> tuple[str, str]:
    """The overlay IP an instance should hold, and why it cannot have one ("" if it can):
    its fixed IP (`network.ip`) unless another holds it, else the one it holds, else a free
    one. `taken` holds every claimed IP (the instance's own included)."""
    if fixed:
        why = net.usable(fixed)
        if not why and fixed != current and fixed in taken:
            why = f"{fixed} is held by another instance"
        return ("", f"network.ip: {why}") if why else (fixed, "")
    if current and not net.usable(current):
        return current, ""
    ip = net.pick(taken, rng)
    return (ip, "") if ip else ("", f"no free address left in the overlay network {net.cidr}")
