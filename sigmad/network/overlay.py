"""The data plane of one host (DESIGN.md §5): the only module that imports pyroute2. The
VXLAN overlay (`Overlay`) and the host-compatible fast path (`FastPath`, its invariants in
its docstring).

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

import ctypes
import logging
import os
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
def netlink() -> Iterator[Any]:
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
        with netlink() as ipr:
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
        with netlink() as ipr:
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
        with netlink() as ipr:
            vx = self._index(ipr, self.t.device)
            if vx is not None:
                ipr.link("del", index=vx)


# --- The host-compatible fast path ------------------------------------------------------------

INGRESS = 0xFFFFFFF2  # the clsact qdisc's ingress hook (TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS))
ETH_P_ALL, ETH_P_IP, ETH_P_ARP = 0x0003, 0x0800, 0x0806
ARP_PRIO = 1  # the uplink's ARP-copying filter; a port's filter has its host port as priority
BACK_PRIO = 1  # the filter on the host side of an instance's veth
PEER = "sigma-hc"  # the instance's side of its fast-path veth
RULE_PRIO = 100  # the instance's rule: traffic from the host's address uses TABLE
TABLE = 100
IP_PROTO = {"tcp": 6, "udp": 17}


@dataclass(frozen=True)
class FastInstance:
    """A running host-compatible instance of this host: its container (id, main process)
    and its host ports as (port, protocol)."""

    container: str
    pid: int
    ports: tuple[tuple[int, str], ...]

    @property
    def device(self) -> str:
        """The host side of its veth (15 characters at most, as the kernel wants)."""
        return "shc" + self.container[:12]


def _ip_hex(address: str) -> int:
    return int.from_bytes(bytes(int(b) for b in address.split(".")), "big")


def _port_keys(address: str, port: int, protocol: str) -> list[str]:
    """u32 keys (value/mask+offset of the IPv4 header) of packets to `address:port`: the
    destination address, the protocol, the destination port (a header without options)."""
    return [f"0x{_ip_hex(address):08x}/0xffffffff+16",
            f"0x{IP_PROTO[protocol] << 16:08x}/0x00ff0000+8",
            f"0x{port:08x}/0x0000ffff+20"]


def _mirred_targets(flt: Any) -> list[int]:
    """The devices a u32 filter's mirred actions send to (none: not one of ours)."""
    acts = flt.get_nested("TCA_OPTIONS", "TCA_U32_ACT")
    found = []
    for _, act in (acts["attrs"] if acts is not None else []):
        parms = act.get_nested("TCA_ACT_OPTIONS", "TCA_MIRRED_PARMS")
        if parms is not None:
            found.append(int(parms["ifindex"]))
    return found


def _ours(ipr: Any, index: int) -> dict[int, tuple[int, list[int]]]:
    """The mirred filters on a device's ingress: priority → (the filter's `info`: priority
    and protocol, the devices it sends to)."""
    return {f["info"] >> 16: (f["info"], targets)
            for f in ipr.get_filters(index=index, parent=INGRESS)
            if (targets := _mirred_targets(f))}


def _drop(ipr: Any, index: int, info: int) -> None:
    """Delete one filter (priority and protocol in `info`) of a device's ingress. (Without
    both, the kernel deletes every filter of the hook.)"""
    if info >> 16 == 0:
        raise OverlayError("refusing to delete a filter without a priority")
    ipr.tc("del-filter", index=index, parent=INGRESS, info=info)


def _clsact(ipr: Any, index: int) -> None:
    if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=index)):
        ipr.tc("add", "clsact", index=index)


CLONE_NEWNET = 0x40000000
_LIBC = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _LIBC.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


@contextmanager
def _inside_of(pid: int) -> Iterator[Any]:
    """A netlink socket of process `pid`'s network namespace, this thread inside it until the
    block ends (setns moves one thread only). Not pyroute2's own `netns=`: it forks a child
    that it ends with SIGTERM, and the child's signal reaches the agent's event loop through
    the shared wakeup fd (the agent stops)."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            _setns(target)
            try:
                with netlink() as ipr:
                    yield ipr
            finally:
                _setns(own)  # (a thread left inside would program the instance, not the host)
        finally:
            os.close(target)
    finally:
        os.close(own)


class FastPath:
    """The host-compatible data path (README "Host-compatible networking").

    Each instance gets a veth of its own besides its overlay one: inside, `sigma-hc` carries
    the host's address (/32) and the uplink's MAC, and a rule sends whatever leaves from the
    host's address through it (a table with the uplink's routes). On the uplink's clsact
    ingress, one u32 filter per host port (priority = the port) redirects the packets to the
    host's address and port straight to that veth, and a filter copies ARP to every such veth
    (an instance resolves its clients' MACs as the host does); on the host side of the veth,
    a filter redirects everything to the uplink. So the packets skip the host's netfilter,
    routing and bridge both ways: no NAT, no conntrack on the host. Docker's own publishing of
    the same port stays underneath (clients on the host itself, and any moment before the
    filters exist). `sync` is idempotent: it reads the kernel's state and changes what
    differs, so an agent restart disturbs no connection."""

    def __init__(self, address: str) -> None:
        self.address = address  # the host's underlay address: the instances' address too

    def sync(self, wanted: list[FastInstance]) -> Changes:
        """Make the uplink's filters and the instances' veths exactly those of `wanted`."""
        done = Changes()
        with netlink() as ipr:
            uplink, mac, routes = self._uplink(ipr)
            devices: dict[int, int] = {}  # host port → ifindex of its instance's veth
            arp_to: list[int] = []
            for inst in wanted:
                index = self._veth(ipr, inst, uplink, mac, routes, done)
                if index is None:
                    continue
                arp_to.append(index)
                for port, _ in inst.ports:
                    devices[port] = index
            self._filters(ipr, uplink, wanted, devices, sorted(arp_to), done)
            self._remove_stale(ipr, {i.device for i in wanted}, done)
        return done

    def _uplink(self, ipr: Any) -> tuple[int, str, list[dict[str, Any]]]:
        """The device holding the host's address, its MAC and its main-table routes."""
        found = ipr.get_addr(family=2, address=self.address)
        if not found:
            raise OverlayError(f"no device holds the host's address {self.address}")
        index = int(found[0]["index"])
        mac = ipr.link("get", index=index)[0].get("IFLA_ADDRESS")
        routes = [{"dst": r.get("RTA_DST"), "dst_len": r["dst_len"],
                   "gateway": r.get("RTA_GATEWAY"), "scope": r["scope"]}
                  for r in ipr.get_routes(family=2, table=254) if r.get("RTA_OIF") == index]
        if not any(r["gateway"] is None for r in routes):
            raise OverlayError(f"the host's address {self.address} has no route on its device")
        routes.sort(key=lambda r: r["gateway"] is not None)  # a gateway's subnet first
        _clsact(ipr, index)
        return index, mac, routes

    def _veth(self, ipr: Any, inst: FastInstance, uplink: int, mac: str,
              routes: list[dict[str, Any]], done: Changes) -> int | None:
        """The host side of the instance's veth, made and set inside if missing; None if the
        instance's process is gone (it ended: the next sync drops it)."""
        index = self._index(ipr, inst.device)
        if index is None:
            try:
                ipr.link("add", ifname=inst.device, kind="veth",
                         peer={"ifname": PEER, "net_ns_pid": inst.pid})
            except NetlinkError as exc:
                if exc.code == 3:  # ESRCH: no such process
                    return None
                raise
            index = self._index(ipr, inst.device)
            done.added += 1
        if index is None:
            raise OverlayError(f"{inst.device} did not appear")
        if not ipr.link("get", index=index)[0]["flags"] & IFF_UP:
            ipr.link("set", index=index, state="up")
        try:
            with _inside_of(inst.pid) as inside:
                self._inside(inside, mac, routes)
        except FileNotFoundError:  # its process ended
            return None
        _clsact(ipr, index)
        back = _ours(ipr, index)
        if [targets for _, targets in back.values()] != [[uplink]]:
            for info, _ in back.values():
                _drop(ipr, index, info)
            ipr.tc("add-filter", "u32", index=index, parent=INGRESS, prio=BACK_PRIO, target=0,
                   protocol=ETH_P_ALL, keys=["0x0/0x0+0"],
                   action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                            "ifindex": uplink}])
        return index

    def _inside(self, ipr: Any, mac: str, routes: list[dict[str, Any]]) -> None:
        """Inside the instance: `sigma-hc` up with the host's MAC and address, the rule and
        the table (idempotent)."""
        index = self._index(ipr, PEER)
        if index is None:
            raise OverlayError(f"{PEER} is missing inside the instance")
        link = ipr.link("get", index=index)[0]
        if link.get("IFLA_ADDRESS") != mac:
            ipr.link("set", index=index, address=mac)
        if not link["flags"] & IFF_UP:
            ipr.link("set", index=index, state="up")
        if not ipr.get_addr(family=2, index=index, address=self.address):
            ipr.addr("add", index=index, address=self.address, prefixlen=32)
        if not any(r.get("FRA_TABLE") == TABLE for r in ipr.get_rules(family=2)):
            ipr.rule("add", table=TABLE, priority=RULE_PRIO, src=self.address, src_len=32)
        for r in routes:
            spec = {"table": TABLE, "oif": index, "dst_len": r["dst_len"], "scope": r["scope"],
                    "prefsrc": self.address}
            if r["dst"]:
                spec["dst"] = r["dst"]
            if r["gateway"]:
                spec["gateway"] = r["gateway"]
            ipr.route("replace", **spec)

    def _filters(self, ipr: Any, uplink: int, wanted: list[FastInstance],
                 devices: dict[int, int], arp_to: list[int], done: Changes) -> None:
        """The uplink's filters: one per host port, and the ARP copy."""
        have = _ours(ipr, uplink)
        protocols = {port: proto for i in wanted for port, proto in i.ports}
        for prio, (info, targets) in have.items():
            if prio != ARP_PRIO and [devices.get(prio)] != targets:
                _drop(ipr, uplink, info)
                done.removed += 1
        for port, index in devices.items():
            if port in have and have[port][1] == [index]:
                continue
            ipr.tc("add-filter", "u32", index=uplink, parent=INGRESS, prio=port, target=0,
                   protocol=ETH_P_IP, keys=_port_keys(self.address, port, protocols[port]),
                   action=[{"kind": "mirred", "direction": "egress", "action": "redirect",
                            "ifindex": index}])
            done.added += 1
        arp = have.get(ARP_PRIO)
        if arp is not None and sorted(arp[1]) != arp_to:
            _drop(ipr, uplink, arp[0])
            arp = None
        if arp is None and arp_to:
            ipr.tc("add-filter", "u32", index=uplink, parent=INGRESS, prio=ARP_PRIO, target=0,
                   protocol=ETH_P_ARP, keys=["0x0/0x0+0"],
                   action=[{"kind": "mirred", "direction": "egress", "action": "mirror",
                            "ifindex": i} for i in arp_to])

    def _remove_stale(self, ipr: Any, keep: set[str], done: Changes) -> None:
        """Delete the veths of instances that no longer run here (their peer goes too)."""
        for link in ipr.get_links():
            name = link.get("IFLA_IFNAME") or ""
            kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
            if name.startswith("shc") and kind == "veth" and name not in keep:
                ipr.link("del", index=link["index"])
                done.removed += 1

    @staticmethod
    def _index(ipr: Any, name: str) -> int | None:
        found = ipr.link_lookup(ifname=name)
        return int(found[0]) if found else None
