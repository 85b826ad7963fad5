"""The VXLAN data plane of one host (DESIGN.md §5): the only module that imports pyroute2.

The Docker network `sigma` owns the bridge; this module enslaves a VXLAN device to it (learning
off: every remote MAC is a static FDB entry towards its node's VTEP, flood entries reach every
peer) and gives the bridge the anycast gateway MAC. The VXLAN bridge port suppresses ARP for
the bridge's own address, so the gateway is always answered on the host itself and never across
the tunnel. Every call is idempotent: it reads the kernel's state and changes only what
differs, so an agent restart disturbs no traffic. The one shortcut: `sync(verify=False)`
trusts the FDB this object last programmed in full (a burst of instance changes must not dump
the whole FDB for each); any failure forgets it, so the next sync reads the kernel again.

The calls are blocking netlink requests: the agent runs them in a worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute, NetlinkError

log = logging.getLogger(__name__)

FLOOD = "00:00:00:00:00:00"
IFF_UP = 0x1
NTF_SELF = 0x02
NTF_MASTER = 0x04
NTF_STICKY = 0x40  # a bridge entry that learning never moves to another port
NUD_NOARP = 0x40  # a bridge's "static" entry (NUD_PERMANENT would mean a local address)
NUD_PERMANENT = 0x80


class OverlayError(Exception):
    """The host's network devices are not as the overlay needs them."""


@dataclass(frozen=True)
class Tunnel:
    """The VXLAN device of this host and the bridge it joins."""

    bridge: str
    device: str
    vni: int
    local: str  # this host's underlay address (its VTEP)
    port: int
    mtu: int
    gateway_mac: str


@dataclass
class Changes:
    added: int = 0
    removed: int = 0


@contextmanager
def _netlink() -> Iterator[Any]:
    """A netlink socket of this network namespace; kernel refusals become OverlayError."""
    try:
        with IPRoute() as ipr:
            yield ipr
    except NetlinkError as exc:
        raise OverlayError(f"netlink: {exc}") from None


class Overlay:
    """Programs one host's tunnel through netlink."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.t = tunnel
        # What the last complete sync left in the FDB: (tunnel entries, bridge statics).
        self._programmed: tuple[set[tuple[str, str]], set[str]] | None = None

    def _index(self, ipr: Any, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def ensure(self) -> bool:
        """Create or fix the VXLAN device, enslave it, and set the gateway MAC; True if
        anything had to change."""
        t = self.t
        changed = False
        with _netlink() as ipr:
            bridge = self._index(ipr, t.bridge)
            if bridge is None:
                raise OverlayError(f"bridge {t.bridge} does not exist (the engine's network "
                                   "should have made it)")
            vx = self._index(ipr, t.device)
            if vx is not None and not self._matches(ipr, vx):
                log.warning("%s has other settings than wanted: re-creating it", t.device)
                ipr.link("del", index=vx)
                vx = None
            if vx is None:
                ipr.link("add", ifname=t.device, kind="vxlan", vxlan_id=t.vni,
                         vxlan_local=t.local, vxlan_port=t.port, vxlan_learning=0, mtu=t.mtu)
                vx = self._index(ipr, t.device)
                changed = True
            link = ipr.link("get", index=vx)[0]
            if link.get("IFLA_MASTER") != bridge or not link["flags"] & IFF_UP \
                    or link.get("IFLA_MTU") != t.mtu:
                ipr.link("set", index=vx, master=bridge, mtu=t.mtu, state="up")
                changed = True
            # Learning off on the bridge port too: remote MACs are programmed, never learnt,
            # so a moved instance's MAC is never stuck behind the tunnel.
            ipr.brport("set", index=vx, learning=0, neigh_suppress=1)
            br = ipr.link("get", index=bridge)[0]
            if br.get("IFLA_ADDRESS") != t.gateway_mac:
                ipr.link("set", index=bridge, address=t.gateway_mac)
                changed = True
            if not br["flags"] & IFF_UP:
                ipr.link("set", index=bridge, state="up")
        return changed

    def _matches(self, ipr: Any, index: int) -> bool:
        info = (ipr.link("get", index=index)[0].get("IFLA_LINKINFO") or {})
        data = info.get("IFLA_INFO_DATA") or {}
        return bool(
            info.get("IFLA_INFO_KIND") == "vxlan"
            and data.get("IFLA_VXLAN_ID") == self.t.vni
            and data.get("IFLA_VXLAN_LOCAL") == self.t.local
            and data.get("IFLA_VXLAN_PORT") == self.t.port
            and not data.get("IFLA_VXLAN_LEARNING")
        )

    def sync(self, remote: dict[str, str], peers: set[str], verify: bool = True) -> Changes:
        """Make the tunnel's FDB exactly: `remote` MAC → VTEP (a tunnel entry, plus a static
        bridge entry pointing at the tunnel port) and a flood entry to each peer VTEP. The
        kernel's FDB is read first when `verify` (or nothing is known of it)."""
        t = self.t
        done = Changes()
        known, self._programmed = self._programmed, None
        with _netlink() as ipr:
            vx = self._index(ipr, t.device)
            bridge = self._index(ipr, t.bridge)
            if vx is None or bridge is None:
                raise OverlayError(f"{t.device} or {t.bridge} is missing: set-up must run first")
            tunnel, static = known if known and not verify else self._read_fdb(ipr, vx)
            want_tunnel = {(mac, vtep) for mac, vtep in remote.items()}
            want_tunnel |= {(FLOOD, vtep) for vtep in peers}
            # A MAC whose VTEP changes (a live move's flip) is re-pointed in one `replace`:
            # a delete then an add would leave it without an entry for a moment, and the
            # tunnel would flood its frames to every peer (both copies of the instance).
            moved = {mac: vtep for mac, vtep in remote.items()
                     if mac != FLOOD and (mac, vtep) not in tunnel
                     and any(m == mac for m, _ in tunnel)}
            for mac, dst in sorted(moved.items()):
                ipr.fdb("replace", ifindex=vx, lladdr=mac, dst=dst, state=NUD_PERMANENT,
                        flags=NTF_SELF)
                done.added += 1
            tunnel = {(m, d) for m, d in tunnel if m not in moved} | set(moved.items())
            for mac, dst in sorted(tunnel - want_tunnel):
                ipr.fdb("del", ifindex=vx, lladdr=mac, dst=dst)
                done.removed += 1
            for mac in sorted(static - set(remote)):
                ipr.fdb("del", ifindex=vx, lladdr=mac, master=bridge, state=NUD_NOARP)
                done.removed += 1
            for mac, dst in sorted(want_tunnel - tunnel):
                # `append`: the all-zero MAC has one entry per peer.
                ipr.fdb("append", ifindex=vx, lladdr=mac, dst=dst, state=NUD_PERMANENT,
                        flags=NTF_SELF)
                done.added += 1
            for mac in sorted(set(remote) - static):
                # `replace`: takes the MAC over from a learnt entry of a local port (the
                # old copy of an instance that just moved away still runs here); sticky:
                # a frame that copy still sends must not move the entry back to its port
                # (the bridge moves a plain static entry when it learns the MAC elsewhere).
                ipr.fdb("replace", ifindex=vx, lladdr=mac, master=bridge, state=NUD_NOARP,
                        flags=NTF_MASTER | NTF_STICKY)
                done.added += 1
        self._programmed = (want_tunnel, set(remote))
        return done

    @staticmethod
    def _read_fdb(ipr: Any, vx: int) -> tuple[set[tuple[str, str]], set[str]]:
        """The tunnel's FDB as (mac, VTEP) tunnel entries and the MACs with a bridge static."""
        tunnel: set[tuple[str, str]] = set()
        static: set[str] = set()  # macs the bridge sends to the tunnel port
        for entry in ipr.fdb("dump", ifindex=vx):
            mac, dst = entry.get("NDA_LLADDR"), entry.get("NDA_DST")
            if dst is not None:
                tunnel.add((mac, dst))
            elif entry.get("NDA_MASTER") and entry["state"] == NUD_NOARP:
                static.add(mac)
        return tunnel, static

    def remove(self) -> None:
        """Delete the VXLAN device (its FDB goes with it)."""
        with _netlink() as ipr:
            vx = self._index(ipr, self.t.device)
            if vx is not None:
                ipr.link("del", index=vx)
