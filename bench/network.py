"""Network data path benchmark: redis-benchmark (SET, GET) and an iperf3 bulk TCP stream from
one lab host to a server on the other, over four paths, in one run:

- bare: the server runs in host h2's own network namespace (no container);
- docker -p: a container on h2's engine with Docker's own port publishing;
- host-compat: a Sigma instance (`network.mode: host-compat`) on h2, reached at h2's address
  and its allocated host port through the agent's fast path (tc redirect, sigmad.node.fastpath);
- overlay: a Sigma instance on h2, reached at its overlay IP from a Sigma instance on h1.

    python bench/network.py [--passes 2] [--rounds 8] [--requests 50000] [--seconds 5] [--keep]

Root: builds a 2-host lab of its own (name `netpath`, subnet 10.81.15.0/24) and removes it on
exit unless --keep. The redis image is built FROM the lab's busybox with this host's
redis-server and the libraries it links (apt-get install redis-server redis-tools iperf3); the
host-compat instance runs it on its host port ($SIGMA_HOST_PORT_REDIS). The clients
(redis-benchmark, iperf3) are the host's binaries, run in h1's namespace (bare, docker -p,
host-compat) or in the client instance's namespace (overlay, with nsenter); iperf3's server
runs in the redis server's namespace the same way. Each path is measured `--passes` times,
the order reversed on every other pass; within a pass the paths' redis-benchmark runs are
interleaved `--rounds` times (the pass's rate of a path is the median of its rounds: two runs
of one path seconds apart differ by up to 1.5x on this virtual machine, even when idle).
CPU is the whole machine's busy time (/proc/stat) during the measurement divided by the work
done: the machine is shared, so it is a rough figure. Writes the "Network data path" section
of docs/benchmarks.md and prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from sigmad.lab import Lab, LabConfig, services  # noqa: E402

PATHS = ("bare", "docker -p", "host-compat", "overlay")
REDIS, IPERF = 6379, 5201


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 600,
        stdin: str | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout,
                            input=stdin, check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {result.stderr.strip() or result.stdout}")
    return result.stdout


def busy_jiffies() -> int:
    """The machine's busy time so far (all CPUs, /proc/stat, in clock ticks)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def net_softirqs() -> int:
    """NET_RX and NET_TX softirqs run so far on all CPUs (/proc/softirqs)."""
    return sum(int(x) for line in Path("/proc/softirqs").read_text().splitlines()
               if line.split()[0] in ("NET_RX:", "NET_TX:") for x in line.split()[1:])


def cpu_us(action: Callable[[], Any]) -> tuple[Any, float, int]:
    """`action()`'s result, the machine's busy CPU time while it ran (µs) and the network
    softirqs it took."""
    before, irqs = busy_jiffies(), net_softirqs()
    result = action()
    return (result, (busy_jiffies() - before) * 1e6 / os.sysconf("SC_CLK_TCK"),
            net_softirqs() - irqs)


def proc_ticks(pid: int) -> int:
    """A process's CPU time so far (user + system, /proc/PID/stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def children_ticks() -> float:
    """The CPU time of this process's waited-for children so far (clock ticks)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK")


def listener(prefix: list[str], port: int) -> int:
    """The pid of the process listening on TCP `port` in the namespace `prefix` runs in."""
    out = run([*prefix, "ss", "-Hltnp", f"sport = :{port}"])
    return int(out.split("pid=", 1)[1].split(",", 1)[0])


def build_image(engine: str, base: str) -> tuple[str, list[str]]:
    """An image FROM the lab's busybox with this host's redis-server and the libraries it
    links (its entrypoint serves on 6379), and the command that serves on the host port
    instead (a host-compat instance serves on its host port itself)."""
    binary = shutil.which("redis-server")
    if binary is None or not shutil.which("redis-benchmark") or not shutil.which("iperf3"):
        raise SystemExit("apt-get install redis-server redis-tools iperf3")
    image = f"{base.split('/', 1)[0]}/netbench-redis:2"
    flags = ["--protected-mode", "no", "--save", "", "--appendonly", "no"]
    services.build_from_host(engine, image, binary, [binary, *flags],
                             Path(tempfile.gettempdir()), base=base)
    on_host_port = ["sh", "-c", f"exec {binary} --port $SIGMA_HOST_PORT_REDIS "
                    "--protected-mode no --save '' --appendonly no"]
    return image, on_host_port


def redis(prefix: list[str], host: str, port: int, requests: int) -> dict[str, float]:
    """requests/s of SET and GET (50 clients) from redis-benchmark run under `prefix`."""
    out = run([*prefix, "redis-benchmark", "-h", host, "-p", str(port), "-c", "50",
               "-n", str(requests), "-t", "set,get", "--csv"])
    got = {}
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.split(",")]
        if cells[0] in ("SET", "GET"):
            got[cells[0]] = float(cells[1])
    return got


def iperf(prefix: list[str], host: str, port: int, seconds: int) -> float:
    """Gbit/s of one iperf3 TCP stream run under `prefix`."""
    out = json.loads(run([*prefix, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds),
                          "-J"]))
    return float(out["end"]["sum_received"]["bits_per_second"]) / 1e9


def wait_port(prefix: list[str], host: str, port: int) -> None:
    for _ in range(100):
        if subprocess.run([*prefix, "redis-cli", "-h", host, "-p", str(port), "ping"],
                          capture_output=True, text=True, check=False).stdout.strip() == "PONG":
            return
        time.sleep(0.2)
    raise SystemExit(f"nothing answers redis on {host}:{port}")


def wait_filter(prefix: list[str], port: int) -> None:
    """Until the host's uplink (eth0) has the fast path's filter for `port`."""
    for _ in range(100):
        if f"pref {port} " in run([*prefix, "tc", "filter", "show", "dev", "eth0", "ingress"]):
            return
        time.sleep(0.2)
    raise SystemExit(f"no fast-path filter for port {port} on the server's host")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--requests", type=int, default=50000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    opts = parser.parse_args()
    lab = Lab(LabConfig(hosts=2, name="netpath", dir=Path("/var/lib/sigma-lab/netpath-bench"),
                        subnet="10.81.15.0/24", etcd_port=free_port(),
                        registry_port=free_port(), listen=f"127.0.0.1:{free_port()}",
                        # each host's engine may use the whole machine, as the bare host does
                        cpu=(os.cpu_count() or 1) * 1000))
    servers: list[subprocess.Popen[bytes]] = []
    try:
        lab.up()
        result = measure(lab, opts, servers)
        write_section(opts.out, "Network data path", section(result, opts))
        print(json.dumps(result))
    finally:
        for proc in servers:  # host processes in the lab's namespaces: not the lab's to stop
            proc.kill()
            proc.wait()
        if not opts.keep:
            lab.down()


def measure(lab: Lab, opts: argparse.Namespace, servers: list[subprocess.Popen[bytes]]
            ) -> dict[str, Any]:
    """Start the servers (host processes among them go to `servers`), then measure."""
    env = {**os.environ, "SIGMA_SERVER": lab.server, "SIGMA_TOKEN": lab.token,
           "SIGMA_CA": lab.ca, "PYTHONPATH": str(REPO)}
    ctl = [sys.executable, "-m", "sigmactl"]
    h1, h2 = lab.hosts[0], lab.hosts[1]
    image, on_host_port = build_image(h2.engine, lab.image)
    in_h1 = ["ip", "netns", "exec", h1.netns]

    def apply(spec: dict[str, Any]) -> dict[str, Any]:
        run([*ctl, "apply", "-f", "-", "--wait", "--timeout", "120"], env, 180,
            json.dumps(spec))
        (inst,) = json.loads(run([*ctl, "get", "instances", "--app", spec["app"], "-o",
                                  "json"], env))
        return dict(inst)

    def pid(engine: str, cid: str) -> str:
        return run(["docker", "-H", engine, "inspect", "-f", "{{.State.Pid}}", cid]).strip()

    def serve(args: list[str]) -> None:
        servers.append(subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))

    def iperf_server(prefix: list[str], port: int = IPERF) -> None:
        serve([*prefix, "iperf3", "-s", "-p", str(port)])

    # bare: redis-server and iperf3 in h2's own namespace
    in_h2 = ["ip", "netns", "exec", h2.netns]
    bare_port = 16379
    serve([*in_h2, "redis-server", "--port", str(bare_port), "--protected-mode", "no",
           "--save", "", "--appendonly", "no"])
    iperf_server(in_h2, IPERF + 1000)
    # docker -p on h2's engine (the lab's dockerd: userland proxy off)
    docker2 = ["docker", "-H", h2.engine]
    cid = run([*docker2, "run", "-d", "--name", "netbench-dockerp", "-p", "16380:6379",
               "-p", f"{IPERF + 1001}:{IPERF}", image]).strip()
    iperf_server(["nsenter", "-t", pid(h2.engine, cid), "-n"])
    # Sigma host-compat and overlay, both on h2; the overlay client on h1
    on = {"placement": {"labels": {"host": h2.name}}}
    hc = apply({"app": "netbench-hc", "replicas": 1, **on, "containers": [
        {"name": "main", "image": image, "command": on_host_port}],
        "network": {"mode": "host-compat", "ports": [{"name": "redis"}, {"name": "iperf"}]}})
    iperf_server(["nsenter", "-t", pid(h2.engine, hc["containers"][0]["id"]), "-n"],
                 hc["host_ports"]["iperf"])
    ov = apply({"app": "netbench-ov", "replicas": 1, **on, "containers": [
        {"name": "main", "image": image}]})
    iperf_server(["nsenter", "-t", pid(h2.engine, ov["containers"][0]["id"]), "-n"])
    client = apply({"app": "netbench-client", "replicas": 1,
                    "placement": {"labels": {"host": h1.name}}, "containers": [
                        {"name": "main", "image": lab.image,
                         "command": ["sh", "-c", "exec sleep 86400"]}]})
    in_client = ["nsenter", "-t", pid(h1.engine, client["containers"][0]["id"]), "-n"]
    targets = {
        "bare": (in_h1, h2.address, bare_port, IPERF + 1000),
        "docker -p": (in_h1, h2.address, 16380, IPERF + 1001),
        "host-compat": (in_h1, h2.address, hc["host_ports"]["redis"],
                        hc["host_ports"]["iperf"]),
        "overlay": (in_client, ov["ip"], REDIS, IPERF),
    }
    server = {  # the redis-server of each path: its CPU time is read around each run
        "bare": listener(in_h2, bare_port), "docker -p": int(pid(h2.engine, cid)),
        "host-compat": int(pid(h2.engine, hc["containers"][0]["id"])),
        "overlay": int(pid(h2.engine, ov["containers"][0]["id"]))}
    for prefix, host, port, _ in targets.values():
        wait_port(prefix, host, port)
    for port in hc["host_ports"].values():  # the agent's fast path is in place (2 s poll)
        wait_filter(in_h2, port)
    passes: list[dict[str, Any]] = []
    load = [os.getloadavg()]
    for n in range(opts.passes):
        order = list(PATHS) if n % 2 == 0 else list(reversed(PATHS))
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in order}
        for _ in range(opts.rounds):  # the paths' redis runs interleaved, round by round
            for name in order:
                prefix, host, port, _ = targets[name]
                ticks = proc_ticks(server[name]) + children_ticks()
                rps, cpu, irqs = cpu_us(
                    lambda p=prefix, h=host, q=port: redis(p, h, q, opts.requests))
                ticks = proc_ticks(server[name]) + children_ticks() - ticks
                runs[name].append({**rps, "cpu": cpu, "irqs": irqs,
                                   "procs": ticks * 1e6 / os.sysconf("SC_CLK_TCK")})
                print(f"  pass {n + 1} round {len(runs[name])} {name}: SET {rps['SET']:.0f}/s "
                      f"GET {rps['GET']:.0f}/s, {cpu / (2 * opts.requests):.1f} µs/req",
                      flush=True)
        got: dict[str, Any] = {}
        for name in order:
            prefix, host, _, iport = targets[name]
            gbps, icpu, _ = cpu_us(
                lambda p=prefix, h=host, q=iport: iperf(p, h, q, opts.seconds))
            done = 2 * opts.requests * opts.rounds
            got[name] = {
                "SET": statistics.median(r["SET"] for r in runs[name]),
                "GET": statistics.median(r["GET"] for r in runs[name]),
                "rounds": [{op: r[op] for op in ("SET", "GET")} for r in runs[name]],
                "cpu_us_per_req": sum(r["cpu"] for r in runs[name]) / done,
                "procs_us_per_req": sum(r["procs"] for r in runs[name]) / done,
                "softirqs_per_req": sum(r["irqs"] for r in runs[name]) / done,
                "gbit_s": gbps, "cpu_s_per_gbit": icpu / 1e6 / (gbps * opts.seconds)}
            print(f"pass {n + 1} {name}: SET {got[name]['SET']:.0f}/s GET "
                  f"{got[name]['GET']:.0f}/s (medians of {opts.rounds}), {gbps:.2f} Gbit/s",
                  flush=True)
        passes.append({"pass": n + 1, "order": " → ".join(order), "paths": got})
    load.append(os.getloadavg())
    return {"passes": passes, "requests": opts.requests, "rounds": opts.rounds,
            "seconds": opts.seconds, "load": load}


def overall(result: dict[str, Any], name: str, op: str) -> float:
    """Path `name`'s median `op` (SET, GET) rate over every round of the run."""
    return statistics.median(r[op] for p in result["passes"] for r in p["paths"][name]["rounds"])


def section(result: dict[str, Any], opts: argparse.Namespace) -> str:
    today = datetime.date.today().isoformat()
    load = [", ".join(f"{x:.2f}" for x in at) for at in result["load"]]
    lines = [
        "## Network data path", "",
        f"Measured {today} on this machine ({os.cpu_count()} cores, a virtual machine; load "
        f"average (1, 5, 15 min) {load[0]} at the start and {load[1]} at the end, the lab's "
        f"own work included; Linux {platform.release()}) in one run of:", "", "```",
        f"python bench/network.py --passes {opts.passes} --rounds {opts.rounds} "
        f"--requests {opts.requests} --seconds {opts.seconds}", "```", "",
        "Client on lab host h1, server on h2 (see the docstring of bench/network.py). "
        "redis-benchmark: 50 clients, SET and GET, requests/s, each the median of the pass's "
        f"{opts.rounds} rounds (the four paths' runs interleaved); iperf3: one TCP stream; "
        "ratios to bare within the same pass. CPU: the whole machine's busy time during the "
        "redis runs per request (µs) and during the stream per Gbit (s); client+server: the "
        "CPU time of redis-benchmark and of the redis-server (user + system, which holds most "
        "of the network stack's work done in their system calls and softirqs taken meanwhile) "
        "per request; net softirqs: NET_RX + NET_TX softirqs (/proc/softirqs, all namespaces "
        "share them) per redis request.", "",
        "| pass | path | SET/s | ratio | GET/s | ratio | CPU µs/req | client+server µs/req "
        "| net softirqs/req | Gbit/s | ratio | CPU s/Gbit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in result["passes"]:
        bare = p["paths"]["bare"]
        for name in PATHS:
            r = p["paths"][name]
            lines.append(
                f"| {p['pass']} | {name} | {r['SET']:.0f} | {r['SET'] / bare['SET']:.2f} | "
                f"{r['GET']:.0f} | {r['GET'] / bare['GET']:.2f} | {r['cpu_us_per_req']:.1f} | "
                f"{r['procs_us_per_req']:.1f} | "
                f"{r['softirqs_per_req']:.2f} | "
                f"{r['gbit_s']:.2f} | {r['gbit_s'] / bare['gbit_s']:.2f} | "
                f"{r['cpu_s_per_gbit']:.2f} |")
    cpu = {name: statistics.mean(p["paths"][name]["cpu_us_per_req"] for p in result["passes"])
           for name in PATHS}
    goals = []
    for name, goal in (("host-compat", 0.9), ("overlay", 0.75)):
        got = {op: overall(result, name, op) / overall(result, "bare", op)
               for op in ("SET", "GET")}
        low = min(p["paths"][name][op] / p["paths"]["bare"][op]
                  for p in result["passes"] for op in ("SET", "GET"))
        goals.append(f"{name} ≥ {goal}x bare: SET {got['SET']:.2f}, GET {got['GET']:.2f}, "
                     f"**{'met' if min(got.values()) >= goal else 'not met'}** (lowest of "
                     f"one pass: {low:.2f})")
    lines += ["", "Issue 15's goals, on the median rate of each path over all "
              f"{len(result['passes']) * opts.rounds} of its rounds in this run: "
              + "; ".join(goals) + ". The machine's busy time per request, mean of the "
              "passes: " + ", ".join(f"{name} {us:.1f} µs ({us / cpu['bare']:.2f}x)"
                                     for name, us in cpu.items()) + ".", "",
              "- host-compat is the agent's fast path (README, \"Host-compatible networking\"): "
              "tc filters on h2's uplink redirect the packets for h2's address and the "
              "instance's host port straight to a veth of the instance's own (which holds h2's "
              "address and MAC), and everything from that veth straight back to the uplink: "
              "no netfilter, routing or bridge on h2 for them (bare's packets do meet h2's "
              "netfilter: host-compat can beat bare). `docker -p` is what host-compat was "
              "before (and what Docker's publishing under the fast path still does for "
              "clients on h2 itself): iptables DNAT to the container's address on a bridge, "
              "userland proxy off.",
              "- Where the time went (by hand, 2026-12-06, a 2-host lab, `perf record -a -g` "
              "over 100k redis GETs from h1, twice each; samples of redis-server, "
              "redis-benchmark and ksoftirqd only, by kernel function family): bare 16.5k/18.2k "
              "samples (netfilter 1.9k, bridge 0.8k, IPv4 0.5k), Docker's DNAT 25.0k/20.9k "
              "(netfilter 3.4k/3.0k, bridge 1.1k, IPv4 1.0k/1.1k, veth 0.3k), a tc redirect "
              "16.5k/16.8k (netfilter 1.9k, bridge 0.7k, IPv4 0.5k, tc 0.2k). The DNAT path's "
              "extra cost is conntrack and NAT on h2 (the biggest part), forwarding (a second "
              "routing pass) and the `sigma` bridge; a redirect at the uplink's ingress skips "
              "all three. The netfilter and bridge work of the bare path is the lab's own "
              "underlay (a bridge in the root namespace, conntrack in each host's namespace): "
              "every path pays it.",
              "- The overlay adds a veth pair and the `sigma0` bridge on each host and the "
              "VXLAN encapsulation (MTU 1450). Over 100k GETs (perf, all samples, by hand "
              "2026-12-06) it cost 3.8k samples more than bare, of which the host's netfilter "
              "1.65k and the bridge 1.0k: Docker's `bridge-nf-call-iptables` runs every frame "
              "the bridge forwards through iptables and conntrack. The agent now lets "
              "`sigma0`'s frames go around it (README, \"Overlay data path\"; "
              "sigmad/network/netfilter.py). Its effect, by hand on this lab (2026-12-06, 12 "
              "interleaved rounds of 50k SET + 50k GET, the switch flipped between the two "
              "overlay runs of each round): the machine's busy ticks per round, median, bare "
              "342, overlay through iptables 527, overlay around it 448 (the overlay's extra "
              "CPU down 43 %); the median rate (SET and GET averaged) 35.4k/s through iptables, "
              "40.1k/s around it, bare 49.6k/s (0.71x to 0.81x). Two more candidates, measured the "
              "same way (12 rounds each, by hand, 2026-12-06) and left out: NOTRACK rules for "
              "VXLAN's UDP port in both hosts' raw tables (the outer packets' conntrack): 392 "
              "against 388 ticks; tc redirects between the instances' veths and the VXLAN "
              "device, around the bridge on both hosts: 360 against 344 ticks (-4 %, the rate "
              "+2 %), not worth a second forwarding path beside the bridge's; VXLAN's outer "
              "UDP checksum off (the device re-made with noudpcsum, 8 rounds each): 1.32x "
              "against 1.39x bare's ticks, within the noise. What is left is "
              "the encapsulation itself: VXLAN's work on both ends, a route lookup for every "
              "outer packet received (an unconnected UDP socket gets no early demux) and a "
              "veth hop more on each side than bare's client and server have. The bulk stream's "
              "VXLAN packets cross the underlay as GSO packets of about 52 KB (h2's uplink, by "
              "hand): the MTU of 1450 and the segmentation cost it nothing on these veths (on "
              "real NICs that is their VXLAN offloads' job).",
              "- Network softirqs per redis request are the same on every path (about 2): the "
              "bridge, veth, DNAT and VXLAN work is done inside the softirqs the bare path also "
              "takes, not in more of them.",
              "- Two runs of one path seconds apart differ by up to 1.5x on this virtual "
              "machine even with nothing else running (bare alone: 44k to 69k SET/s over 12 "
              "rounds): read the ratios of each pass, not the absolute rates.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
