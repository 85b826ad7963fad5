"""The host-compatible fast path on the lab (sigmad.node.fastpath): an instance reached from
another host at its host's address and host port through the tc redirect (the filter's own
packet counter shows the request went that way), with its env vars, in a network namespace
of its own with nothing of it listening in the host's; an agent restart leaves the filter in
place; deleting the app removes the filter and the veth and releases the port."""

from __future__ import annotations

import re
import subprocess
from typing import Any

import pytest

from sigmad.node.dockerd import userland_proxy
from tests.integration.conftest import wait_for
from tests.integration.labkit import LabCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
SERVE = ("mkdir -p /www && echo $SIGMA_INSTANCE $SIGMA_HOST_IP:$SIGMA_HOST_PORT_HTTP > "
         "/www/index.html && exec httpd -f -p $SIGMA_HOST_PORT_HTTP -h /www")


def fast_app(lab: LabCluster) -> dict[str, Any]:
    return {"app": "fast", "replicas": 1, "placement": {"labels": {"host": "h2"}},
            "network": {"mode": "host-compat", "ports": [{"name": "http"}]},
            "containers": [{"name": "main", "image": lab.lab.image, "command": ["sh", "-c", SERVE],
                            "resources": {"request": {"cpu": "10m", "memory": "8Mi"},
                                          "limit": {"memory": "64Mi"}}}]}


def redirected(lab: LabCluster, port: int) -> tuple[str, int] | None:
    """The device h2's uplink filter for `port` redirects to and the packets it has
    redirected, or None if there is no such filter."""
    out = lab.in_host("h2", "tc", "-s", "filter", "show", "dev", "eth0", "ingress")
    block = re.search(rf"pref {port} u32 .*?Redirect to device (\S+)\).*?Sent \d+ bytes "
                      r"(\d+) pkt", out, re.S)
    return (block.group(1), int(block.group(2))) if block else None


def fetch(lab: LabCluster, url: str) -> str:
    """HTTP GET of `url` from host h1's namespace ("" if nothing answers)."""
    try:
        return lab.in_host("h1", "wget", "-qO-", "-T", "3", url).strip()
    except subprocess.SubprocessError:  # wget failed: nothing answered
        return ""


def test_fast_path_reaches_the_instance_at_the_host_port_and_goes_on_delete(
        lab: LabCluster) -> None:
    lab.apply(fast_app(lab))
    try:
        (inst,) = lab.running("fast", 1)
        port, cid = inst["host_ports"]["http"], inst["containers"][0]["id"]
        address = lab.lab.hosts[1].address
        device = "shc" + cid[:12]
        env = lab.docker("h2", "inspect", "-f", "{{json .Config.Env}}", cid).stdout
        assert f'"SIGMA_HOST_IP={address}"' in env and f'"SIGMA_HOST_PORT_HTTP={port}"' in env
        found = wait_for(lambda: redirected(lab, port), 20, f"h2's filter for port {port}")
        assert found[0] == device
        want = f"fast-0 {address}:{port}"
        assert wait_for(lambda: fetch(lab, f"http://{address}:{port}/"), 20,
                        "an answer from h1") == want
        after = redirected(lab, port)
        assert after is not None and after[1] > found[1]  # it went through the redirect
        # its own namespace, the host's address inside it, nothing listening in the host's
        assert lab.docker("h2", "inspect", "-f", "{{.HostConfig.NetworkMode}}",
                          cid).stdout.strip() != "host"
        inside = lab.in_instance(inst, "ip", "-o", "-4", "addr", "show", "sigma-hc").stdout
        assert f"{address}/32" in inside
        # (dockerd holds the port in h2's namespace, unused, for Docker's publishing
        # underneath the fast path: the reservation its userland-proxy-less mode makes)
        holders = [line for line in lab.in_host("h2", "ss", "-Hltnp").splitlines()
                   if f":{port} " in line]
        assert all('(("dockerd"' in line for line in holders), holders
        # an agent restart keeps the filter (its counter goes on) and the path
        lab.lab.restart_agent("h2")
        assert fetch(lab, f"http://{address}:{port}/") == want
        kept = redirected(lab, port)
        assert kept is not None and kept[0] == device and kept[1] > after[1]
    finally:
        lab.delete("fast")
    wait_for(lambda: redirected(lab, port) is None, 20, f"h2's filter for port {port} gone")
    links = lab.in_host("h2", "ip", "-o", "link", "show")
    assert device not in links
    assert not any(k.startswith(f"h2/{port}") for k in lab.port_claims())


def forward_counter(lab: LabCluster, node: str) -> int:
    """Packets Docker's `FORWARD -i sigma0 -o sigma0 -j ACCEPT` rule on `node` has seen: frames
    bridged on sigma0 that went through iptables."""
    out = lab.in_host(node, "iptables", "-w", "10", "-L", "FORWARD", "-v", "-x", "-n")
    (line,) = [x for x in out.splitlines() if re.search(r"ACCEPT .* sigma0\s+sigma0\s", x)]
    return int(line.split()[0])


def test_overlay_frames_skip_iptables_and_the_hairpin_to_a_host_port_still_answers(
        lab: LabCluster) -> None:
    """sigmad.network.netfilter: frames bridged between instances go around h2's iptables
    (Docker's own FORWARD rule for them counts none of them), the other bridges keep their
    netfilter, and an instance on h2 still reaches another instance's host port on h2
    (DNATed back onto the bridge: the hairpin rule)."""
    for node in ("h1", "h2"):
        flags = lab.in_host(node, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables")
        assert flags.strip() == "0"
        for bridge, flag in (("sigma0", "0"), ("docker0", "1")):
            assert f" nf_call_iptables {flag} " in lab.in_host(node, "ip", "-d", "link", "show",
                                                                 bridge)
        assert "sigma overlay hairpin" in lab.in_host(node, "iptables", "-w", "10", "-t",
                                                      "nat", "-S", "POSTROUTING")
    lab.apply(fast_app(lab))
    lab.apply({"app": "peer", "replicas": 3, "placement": {"spread": "host"},
               "containers": [{"name": "main", "image": lab.lab.image,
                               "command": ["sh", "-c", "exec sleep 3600"],
                               "resources": {"request": {"cpu": "10m", "memory": "8Mi"}}}]})
    try:
        (fast,) = lab.running("fast", 1)
        peers = {i["node"]: i for i in lab.running("peer", 3)}  # one on each host
        port, address = fast["host_ports"]["http"], lab.lab.hosts[1].address
        before = forward_counter(lab, "h2")
        # across the tunnel: h1's peer to the fast instance's overlay IP (bridged on both)
        for _ in range(3):
            got = lab.in_instance(peers["h1"], "timeout", "3", "wget", "-qO-",
                                  f"http://{fast['ip']}:{port}/").stdout.strip()
            assert got == f"fast-0 {address}:{port}"
        assert forward_counter(lab, "h2") == before
        # the hairpin: h2's peer to h2's address and the fast instance's host port
        got = wait_for(lambda: lab.in_instance(
            peers["h2"], "timeout", "3", "wget", "-qO-", f"http://{address}:{port}/"
        ).stdout.strip(), 20, "an answer at the host port from an instance on the same host")
        assert got == f"fast-0 {address}:{port}"
    finally:
        lab.delete("fast")
        lab.delete("peer")


def test_the_lab_dockerds_run_without_the_userland_proxy_and_the_agent_sees_it(
        lab: LabCluster) -> None:
    """sigmad.node.dockerd reads each lab engine's daemon (--userland-proxy=false) through its
    socket; the agents of the lab warned of nothing about it."""
    for node, url in lab.lab.engines.items():
        assert userland_proxy(url) is False, node
        log = (lab.lab.root / node / "node.log").read_text()
        assert "userland proxy" not in log, node
