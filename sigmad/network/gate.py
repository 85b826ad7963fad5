"""The SYN gate of an instance's old copy while a live move drains it (sigmad.control.moves):
with overlay.py the only modules that import pyroute2.

A copy's traffic from the bridge leaves through the host side of its veth; a tc filter
there (clsact egress, a classic BPF direct-action classifier: it needs no tc action module;
priority PRIO) drops every TCP SYN without ACK to the instance's
IP, so no new connection reaches the copy and none is reset: the client's kernel sends the
SYN again about a second later, and after the flip it reaches the new copy. Every other
packet passes, so the copy's open connections finish. The filter is found again by its
priority (an agent restart reads back what it owns: `closed_ports`); it goes with the veth
when the copy stops.

The container side (its interface's `iflink`, its TCP sockets) is read through
/proc/<pid> of the copy's network-holding container. Blocking calls: run them in a thread.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

from pyroute2 import IPRoute, NetlinkError
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, nla
from pyroute2.netlink.rtnl import RTM_NEWTFILTER
from pyroute2.netlink.rtnl.tcmsg import tcmsg
from pyroute2.netlink.rtnl.tcmsg.sched_bpf import TCA_BPF_FLAG_ACT_DIRECT

from sigmad.network.overlay import OverlayError

PRIO = 0xC1A  # the priority of the gate's filter: no one else's filter uses it
HANDLE = 1  # the filter's handle (one gate per veth)
EGRESS = 0xFFFFFFF3  # clsact's egress hook (towards the container)
ETH_P_ALL = 0x0003
SHOT, UNSPEC = 2, 0xFFFFFFFF  # a direct-action classifier's verdicts: drop, no opinion
EEXIST, ENOENT, ENODEV, EINVAL = 17, 2, 19, 22
# TCP states that mean a connection still in use (/proc/net/tcp `st`): every state but
# LISTEN, TIME_WAIT, CLOSE and FIN_WAIT2 (the copy has sent its all, the peer saw the end).
BUSY = {0x01, 0x02, 0x03, 0x04, 0x08, 0x09, 0x0B}


def syn_program(ip: str) -> list[tuple[int, int, int, int]]:
    """The classic BPF program (code, jt, jf, k) of the gate, a direct-action tc classifier
    on an Ethernet frame: an unfragmented IPv4 TCP segment to `ip` with SYN set and ACK
    clear is dropped; every other frame passes to the next filter."""
    return [
        (0x28, 0, 0, 12),  # ldh [12]: the EtherType
        (0x15, 0, 11, 0x0800),  # IPv4, else pass
        (0x30, 0, 0, 23),  # ldb [23]: the IP protocol
        (0x15, 0, 9, 6),  # TCP, else pass
        (0x20, 0, 0, 30),  # ld [30]: the destination address
        (0x15, 0, 7, int(ipaddress.IPv4Address(ip))),  # the instance's, else pass
        (0x28, 0, 0, 20),  # ldh [20]: the fragment offset
        (0x45, 5, 0, 0x1FFF),  # a later fragment: pass
        (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf): the IP header's length
        (0x50, 0, 0, 27),  # ldb [x+27]: the TCP flags
        (0x54, 0, 0, 0x12),  # and SYN|ACK
        (0x15, 0, 1, 0x02),  # SYN alone: drop, else pass
        (0x06, 0, 0, SHOT),
        (0x06, 0, 0, UNSPEC),
    ]


class _gate_options(nla):
    """cls_bpf's options with classic BPF ops (pyroute2 knows only an eBPF fd)."""

    _nlmsg_base__compiled_nla = False  # compile this map, not inherit nla's compiled one
    nla_map = (
        ("TCA_BPF_UNSPEC", "none"),
        ("TCA_BPF_ACT", "hex"),
        ("TCA_BPF_POLICE", "hex"),
        ("TCA_BPF_CLASSID", "uint32"),
        ("TCA_BPF_OPS_LEN", "uint16"),
        ("TCA_BPF_OPS", "cdata"),
        ("TCA_BPF_FD", "uint32"),
        ("TCA_BPF_NAME", "asciiz"),
        ("TCA_BPF_FLAGS", "uint32"),
    )


class _gate_msg(tcmsg):
    """A tc filter request whose options are `_gate_options`."""

    _nlmsg_base__compiled_nla = False  # compile this map, not inherit tcmsg's compiled one
    nla_map = tuple(("TCA_OPTIONS", "gate_options") if entry[0] == "TCA_OPTIONS" else entry
                    for entry in tcmsg.nla_map)
    gate_options = _gate_options


def request(port: int, ip: str) -> tcmsg:
    """The netlink request that adds the gate of `ip` to `port` (encode() makes its bytes)."""
    program = syn_program(ip)
    msg = _gate_msg()
    msg["header"]["type"] = RTM_NEWTFILTER
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    msg["family"], msg["index"], msg["handle"], msg["parent"] = 0, port, HANDLE, EGRESS
    msg["info"] = (PRIO << 16) | socket.htons(ETH_P_ALL)
    msg["attrs"] = [["TCA_KIND", "bpf"], ["TCA_OPTIONS", {"attrs": [
        ["TCA_BPF_OPS_LEN", len(program)],
        ["TCA_BPF_OPS", b"".join(struct.pack("=HBBI", *op) for op in program)],
        ["TCA_BPF_FLAGS", TCA_BPF_FLAG_ACT_DIRECT],
    ]}]]
    return msg


def close(port: int, ip: str) -> bool:
    """Drop new connections to `ip` on the host-side veth `port` (ifindex); False if the
    gate was already there."""
    try:
        with IPRoute() as ipr:
            if _has_gate(ipr, port):
                return False
            try:
                ipr.tc("add", "clsact", port)
            except NetlinkError as exc:
                if exc.code != EEXIST:  # the port has one already
                    raise
            # (a batch of one: the plain request of this pyroute2's sync API fails)
            ipr.nlm_request_batch([request(port, ip)])
    except (NetlinkError, OSError, ValueError, struct.error) as exc:
        raise OverlayError(f"netlink: SYN gate on port {port}: {exc}") from None
    return True


def open_(port: int) -> None:
    """Lift the gate of `port` (nothing if it has none, or the veth is gone)."""
    try:
        with IPRoute() as ipr:
            if _has_gate(ipr, port):
                ipr.tc("del-filter", "bpf", port, parent=EGRESS, prio=PRIO,
                       protocol=ETH_P_ALL)
    except NetlinkError as exc:
        if exc.code not in (ENOENT, ENODEV, EINVAL):  # gone meanwhile
            raise OverlayError(f"netlink: SYN gate on port {port}: {exc}") from None


def closed_ports(bridge: str) -> set[int]:
    """The ports (ifindexes) of `bridge` that have a gate."""
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=bridge)
            if not found:
                return set()
            ports = [link["index"] for link in ipr.get_links()
                     if link.get("IFLA_MASTER") == found[0]]
            return {p for p in ports if _has_gate(ipr, p)}
    except NetlinkError as exc:
        raise OverlayError(f"netlink: reading SYN gates: {exc}") from None


def _has_gate(ipr: IPRoute, port: int) -> bool:
    try:
        filters = ipr.get_filters(index=port, parent=EGRESS)
    except NetlinkError as exc:
        if exc.code in (ENOENT, ENODEV, EINVAL):  # no clsact qdisc, or no such device
            return False
        raise
    return any(f.get("info", 0) >> 16 == PRIO for f in filters)


def host_port(pid: int, mac: str, proc: str = "/proc") -> int | None:
    """The host-side ifindex of the veth of the container `pid` whose interface has `mac`
    (its `iflink`, read through the container's own /sys); None if none has it."""
    net = Path(proc, str(pid), "root/sys/class/net")
    try:
        for dev in net.iterdir():
            try:
                if (dev / "address").read_text().strip().lower() == mac.lower():
                    link = int((dev / "iflink").read_text())
                    return link if link != int((dev / "ifindex").read_text()) else None
            except (OSError, ValueError):
                continue
    except OSError:
        return None
    return None


def busy(pid: int, ip: str, proc: str = "/proc") -> int:
    """The TCP connections of the container `pid` (its network namespace) on `ip` still in
    use (BUSY states)."""
    count = 0
    for name in ("tcp", "tcp6"):
        try:
            text = Path(proc, str(pid), "net", name).read_text()
        except OSError:
            continue
        count += count_busy(text, ip)
    return count


def count_busy(table: str, ip: str) -> int:
    """The connections of a /proc/net/tcp or tcp6 table whose local address is `ip` (an
    IPv4 one, also as a v4-mapped IPv6 address) in a BUSY state."""
    count = 0
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        local, state = fields[1].split(":")[0], int(fields[3], 16)
        if state in BUSY and _ipv4(local) == ip:
            count += 1
    return count


def _ipv4(hexaddr: str) -> str:
    """An address of /proc/net/tcp[6] (words in host byte order) as dotted IPv4, or ""."""
    try:
        words = [int(hexaddr[i:i + 8], 16) for i in range(0, len(hexaddr), 8)]
    except ValueError:
        return ""
    if len(words) == 4:
        if words[:2] != [0, 0] or struct.pack("=I", words[2]) != b"\0\0\xff\xff":
            return ""
        words = words[3:]
    return socket.inet_ntoa(struct.pack("=I", words[0])) if len(words) == 1 else ""
