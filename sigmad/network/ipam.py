"""Overlay addresses (DESIGN.md §5): the cluster CIDR, MACs derived from IPs, and picking a
free address. Claims are `alloc/ip/{ip}` keys created only if absent (sigmad.controller), so
two instances never hold one IP, even with two masters racing.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import socket
import struct
from dataclasses import dataclass

NETWORK = "sigma"  # the Docker network every host's engine has
BRIDGE = "sigma0"  # its bridge device, the same name on every host
VXLAN = "sigma-vx"  # the tunnel device enslaved to the bridge
VNI = 4244
VXLAN_PORT = 4789
MTU = 1450  # 1500 on the underlay minus VXLAN's 50 bytes
RANDOM_TRIES = 64
_RNG = random.Random()


def mac_for(ip: str) -> str:
    """The MAC of an overlay IP: 0a:58 (locally administered) then the IP's four bytes, so a
    moved instance keeps its MAC and its peers' ARP caches stay right."""
    address = _address(ip)
    if address is None:
        raise ValueError(f"{ip!r} is not an IPv4 address")
    return "0a:58:" + ":".join(f"{b:02x}" for b in address.to_bytes(4, "big"))


@dataclass(frozen=True)
class OverlayNet:
    """The cluster CIDR: its first address is the anycast gateway on every host."""

    cidr: str

    @property
    def network(self) -> ipaddress.IPv4Network:
        return _network(self.cidr)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def usable(self, ip: str) -> str:
        """Why `ip` cannot be an instance's address ("" if it can)."""
        addr = _address(ip)
        if addr is None:
            return f"{ip!r} is not an IPv4 address"
        net = self.network
        low = int(net.network_address)
        if not low <= addr <= int(net.broadcast_address):
            return f"{ip} is outside the cluster network {net}"
        if addr in (low, low + 1, int(net.broadcast_address)):
            return f"{ip} is reserved in {net} (network, gateway or broadcast address)"
        return ""

    def pick(self, taken: set[str], rng: random.Random | None = None) -> str | None:
        """A free address: random first (racing masters rarely pick the same), then the
        first free one in order; None when the network is full."""
        rng = rng or _RNG
        net = self.network
        first, size = int(net.network_address) + 2, net.num_addresses - 3
        for _ in range(RANDOM_TRIES):
            ip = _dotted(first + rng.randrange(size))
            if ip not in taken:
                return ip
        for n in range(size):
            ip = _dotted(first + n)
            if ip not in taken:
                return ip
        return None


@functools.cache
def _network(cidr: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(cidr)


def _address(ip: str) -> int | None:
    """The int of a dotted IPv4 address (None if it is not one, as IPv4Address judges)."""
    parts = ip.split(".")
    if len(parts) == 4 and all(p.isdigit() and p.isascii() and (p == "0" or p[0] != "0")
                               and int(p) < 256 for p in parts):
        return int(struct.unpack("!I", socket.inet_aton(ip))[0])
    try:
        return int(ipaddress.IPv4Address(ip))
    except ValueError:
        return None


def _dotted(address: int) -> str:
    """An IPv4 address (as an int) in dotted form (what str(IPv4Address) gives, faster)."""
    return socket.inet_ntoa(struct.pack("!I", address))


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
