"""The host netfilter settings of the overlay bridge (README "Overlay data path"): frames
bridged between instances (this host's veths and the VXLAN port of `sigma0`) skip the host's
iptables and conntrack, which cost half of what the overlay adds to a request (bench/network.py).

The kernel's bridge netfilter hooks run for a bridge when either the network namespace's
`net.bridge.bridge-nf-call-iptables` or the bridge's own `nf_call_iptables` is on; Docker turns
the first on when it creates a bridge network. So the agent turns every other bridge's own flag
on first (each keeps what it had), then the namespace's off, leaving `sigma0` the one bridge
whose frames go around iptables. Routed traffic (to and from the host, NAT, published ports) is
not bridged and keeps all of netfilter.

What a bridged hook was needed for comes back as one rule: a request from an instance to a port
Docker publishes for another instance on the same bridge is DNATed back onto the bridge, and
its answer, bridged straight back, would skip the un-DNAT; the agent's hairpin rule
(POSTROUTING, MASQUERADE of DNATed connections from the overlay leaving through `sigma0`) makes
the answer go through the host instead.

Invariants:
- applied at the agent's start and with every full overlay sync (RESYNC seconds), so what a
  dockerd (re)start or a new bridge turns back on is put right within that time;
- `overlay_netfilter: true` in node.yaml restores what Docker sets (the namespace's switch on,
  no hairpin rule): iptables rules then see bridged overlay frames again;
- without the br_netfilter module no bridged frame meets iptables: nothing to do.
Blocking calls (netlink, iptables): run them in a thread.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from sigmad.network.overlay import OverlayError, netlink

SWITCH = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")  # this namespace's
COMMENT = "sigma overlay hairpin"


def hairpin_rule(bridge: str, cidr: str) -> list[str]:
    """The args after `iptables -t nat -I|-C|-D` of the hairpin rule."""
    return ["POSTROUTING", "-s", cidr, "-o", bridge, "-m", "conntrack", "--ctstate", "DNAT",
            "-m", "comment", "--comment", COMMENT, "-j", "MASQUERADE"]


def _iptables(*args: str) -> int:
    """`iptables -w 10 ARGS`'s exit status; OverlayError when it cannot run or says why."""
    binary = shutil.which("iptables")
    if binary is None:
        raise OverlayError("iptables is not installed (the engine needs it too)")
    result = subprocess.run([binary, "-w", "10", *args], capture_output=True, text=True,
                            timeout=30, check=False)
    if result.returncode not in (0, 1) or (result.returncode == 1 and "-C" not in args):
        raise OverlayError(f"iptables {' '.join(args)}: {result.stderr.strip()}")
    return result.returncode


def _bridge_flags(bridge: str, keep_netfilter: bool) -> int:
    """Set each bridge's own nf_call_iptables: on for all but `bridge` (and for it too when
    `keep_netfilter`); how many had to change."""
    changed = 0
    with netlink() as ipr:
        for link in ipr.get_links():
            info = link.get("IFLA_LINKINFO") or {}
            if info.get("IFLA_INFO_KIND") != "bridge":
                continue
            want = int(keep_netfilter or link.get("IFLA_IFNAME") != bridge)
            if (info.get("IFLA_INFO_DATA") or {}).get("IFLA_BR_NF_CALL_IPTABLES") != want:
                ipr.link("set", index=link["index"], kind="bridge", br_nf_call_iptables=want)
                changed += 1
    return changed


def apply(bridge: str, cidr: str, keep_netfilter: bool = False) -> bool:
    """Let `bridge`'s frames skip iptables (or, `keep_netfilter`, restore Docker's setting);
    True if anything had to change."""
    if not SWITCH.exists():
        return False
    changed = _bridge_flags(bridge, keep_netfilter) > 0
    rule = hairpin_rule(bridge, cidr)
    present = _iptables("-t", "nat", "-C", *rule) == 0
    if keep_netfilter:
        if SWITCH.read_text().strip() != "1":
            SWITCH.write_text("1")
            changed = True
        if present:
            _iptables("-t", "nat", "-D", *rule)
            changed = True
        return changed
    if not present:
        _iptables("-t", "nat", "-I", *rule)
        changed = True
    if SWITCH.read_text().strip() != "0":
        SWITCH.write_text("0")
        changed = True
    return changed
