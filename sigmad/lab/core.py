"""The Lab: builds, inspects, breaks, heals and removes a lab of test hosts on this machine."""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sigmactl import contexts
from sigmad.lab import net, preflight, services, system, teardown, trust
from sigmad.lab.config import RUN_ROOT, LabConfig, LabError
from sigmad.lab.state import (
    STATE_FILE,
    HostState,
    LabState,
    LoopDisk,
    MasterState,
    lab_context,
    pointer,
    resolve_dir,
    span,
)

log = logging.getLogger(__name__)
Say = Callable[[str], None]


class Lab:
    """N test hosts (netns + dockerd + agent each) on an underlay bridge, with etcd, a
    registry and one master (or more: an HA pair). Methods block; the state lives in
    DIR/lab.json."""

    def __init__(self, config: LabConfig | None = None, out: Say | None = None) -> None:
        self.config = config or LabConfig()
        self.say: Say = out or log.info
        self.state: LabState | None = LabState.load(self.config.root)

    @classmethod
    def load(cls, directory: Path | str, out: Say | None = None) -> Lab:
        """The lab whose state is in `directory`/lab.json (LabError if there is none)."""
        state = LabState.load(Path(directory).absolute())
        if state is None:
            raise LabError(f"there is no lab in {directory} (no {STATE_FILE})")
        lab = cls(LabConfig.from_dict({**state.config, "dir": state.dir}), out)
        lab.state = state
        return lab

    @classmethod
    def open(cls, name: str = "sigma", directory: Path | None = None,
             out: Say | None = None) -> Lab:
        """Lab NAME (found via --dir, the pointer `up` left, or the default directory),
        whether or not it exists yet."""
        root = resolve_dir(name, directory)
        if (root / STATE_FILE).exists():
            return cls.load(root, out)
        return cls(LabConfig(name=name, dir=root), out)

    # -- what tests and scripts read --------------------------------------------------------

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def root(self) -> Path:
        return self.config.root

    def _state(self) -> LabState:
        if self.state is None:
            raise LabError(f"there is no lab named {self.name} ({self.root / STATE_FILE})")
        return self.state

    @property
    def hosts(self) -> list[HostState]:
        return list(self._state().hosts)

    def host(self, name: str) -> HostState:
        return self._state().host(name)

    @property
    def engines(self) -> dict[str, str]:
        return {h.name: h.engine for h in self.hosts}

    @property
    def netns(self) -> dict[str, str]:
        return {h.name: h.netns for h in self.hosts}

    @property
    def addresses(self) -> dict[str, str]:
        return {h.name: h.address for h in self.hosts}

    @property
    def server(self) -> str:
        return self._state().server

    @property
    def token(self) -> str:
        return self._state().token

    @property
    def image(self) -> str:
        return self._state().image

    @property
    def redis_image(self) -> str:
        """The lab's redis-server image ("" if this host has none)."""
        return self._state().redis_image

    @property
    def masters(self) -> list[MasterState]:
        return list(self._state().masters)

    @property
    def ca(self) -> str:
        """The lab's CA certificate ("" without TLS): sigmactl's SIGMA_CA."""
        return self._state().ca

    @property
    def tls_root(self) -> Path | None:
        """The lab's directory when it runs with TLS (its pki is under it)."""
        return Path(self._state().dir) if self._state().ca else None

    def restart_master(self, listen: str, sigmad: str = "") -> None:
        """Start the master listening on `listen` again (after a crash) with its config;
        with `sigmad`, that executable (an installed one: an upgrade) instead of this tree."""
        s = self._state()
        m = next((m for m in s.masters if m.listen == listen), None)
        if m is None:
            raise LabError(f"no master of lab {s.name} listens on {listen}")
        if system.owned(m.pid, m.config):
            system.stop([m.pid], timeout=20)
        m.pid = services.spawn_master(Path(m.config), sigmad)
        s.save()
        self.say(f"master on {listen} restarted (pid {m.pid})")

    # -- up ---------------------------------------------------------------------------------

    def up(self) -> None:
        """Build the lab. On failure what was made stays (and is in lab.json) for `down`."""
        preflight.check(self.config)
        cfg, started = self.config, time.monotonic()
        cfg.root.mkdir(parents=True, exist_ok=True)
        cfg.root.chmod(0o700)
        state = LabState(cfg.name, str(cfg.root), cfg.subnet, cfg.bridge_ip, cfg.to_dict())
        self.state = state
        state.save()
        RUN_ROOT.mkdir(parents=True, exist_ok=True)
        pointer(cfg.name).write_text(f"{cfg.root}\n")
        self._up_network(state)
        if cfg.tls:
            self.say(f"making the lab's CA and certificates in {trust.pki_dir(cfg.root)}")
            trust.make_pki(cfg, state.hosts)
            state.ca = trust.ca_file(cfg.root)
            state.save()
        self._up_services(state)
        self._up_sigma(state)
        state.credentials = str(contexts.remember(
            lab_context(cfg.name), [services.master_url(m.listen, state.ca) for m in state.masters],
            state.token, state.ca))
        state.ready = True
        state.save()
        self.say(f"lab {cfg.name} is up ({cfg.hosts} hosts) in {time.monotonic() - started:.1f}s")

    def _up_network(self, state: LabState) -> None:
        cfg = self.config
        prefix = cfg.network.prefixlen
        self.say(f"creating bridge {cfg.bridge} ({cfg.bridge_ip}/{prefix})")
        state.bridge = cfg.bridge
        state.save()
        net.create_bridge(cfg.bridge, f"{cfg.bridge_ip}/{prefix}")
        if net.have_iptables():
            rule = net.forward_rule(cfg.bridge, f"sigma-lab-{cfg.name}")
            net.add_rule(rule)
            state.iptables_rule = rule
            state.save()
        self.say(f"creating hosts h1..h{cfg.hosts} (netns {cfg.name}-hN, veth, "
                 f"{cfg.host_address(1)} and up)")
        cpu_m, memory = cfg.host_capacity(system.machine_capacity())
        for i in range(1, cfg.hosts + 1):
            name = f"{cfg.name}-h{i}"
            host = HostState(
                name=f"h{i}", netns=name, veth=name, address=cfg.host_address(i),
                root=str(cfg.root / f"h{i}"), engine=f"unix://{cfg.root / f'h{i}' / 'docker.sock'}",
                exec_root=str(RUN_ROOT / name), cgroup_parent=f"sigma-lab-{name}",
                cpu_m=cpu_m, memory=memory,
            )
            state.hosts.append(host)
            state.save()
            net.create_host(host.netns, host.veth, cfg.bridge, f"{host.address}/{prefix}",
                            cfg.bridge_ip)

    def _up_services(self, state: LabState) -> None:
        cfg = self.config
        self.say(f"starting etcd on 127.0.0.1:{cfg.etcd_port} and {cfg.bridge_ip}:{cfg.etcd_port}")
        etcd, state.etcd = services.start_etcd(cfg)
        state.save()
        try:
            asyncio.run(etcd.wait_ready())
        except RuntimeError as exc:
            raise LabError(str(exc)) from None
        if cfg.tls:
            names = [h.name for h in state.hosts]
            self.say(f"etcd auth: user sigma-master writes {services.PREFIX}/, users "
                     f"sigma-node-{span(state.hosts)} only their own node keys")
            trust.setup_access(cfg, etcd.endpoint, services.PREFIX, names)
        self.say(f"starting registry on {cfg.registry_addr}")
        state.registry = services.start_registry(cfg)
        state.save()
        services.wait_registry(state.registry, cfg.root / "registry.log")
        first = state.hosts[0]
        self.say(f"capping each host's engine at {first.cpu_m}m cpu and "
                 f"{first.memory >> 20} MiB (cgroup sigma-lab-{cfg.name}-hN)")
        for host in state.hosts:
            services.cap_host(host)
            state.save()
        self.say(f"starting dockerd on {span(state.hosts)}")
        procs = []
        for host in state.hosts:
            proc = services.dockerd(host, cfg.registry_addr, self.tls_root)
            proc.start()
            assert proc.proc is not None
            host.dockerd_pid = proc.proc.pid
            state.save()
            procs.append(proc)
        services.wait_dockerds(procs)
        self.say(f"building image {cfg.image} on h1")
        services.build_and_push(state.hosts[0].engine, cfg.image, cfg.root)
        self.say("pushed image to the lab registry")
        state.image = cfg.image
        if shutil.which(services.REDIS):  # on the busybox image: readiness checks need sh
            services.build_from_host(state.hosts[0].engine, cfg.redis_image, services.REDIS,
                                     [], cfg.root, base=cfg.image)
            self.say(f"pushed {cfg.redis_image} (this host's redis-server)")
            state.redis_image = cfg.redis_image
        state.save()

    def _up_sigma(self, state: LabState) -> None:
        cfg = self.config
        state.token = secrets.token_hex(24)
        services.write_private(cfg.root / "token", state.token + "\n")
        listens = cfg.master_listens
        self.say(f"starting {'master' if len(listens) == 1 else 'masters'} on "
                 f"{', '.join(listens)}")
        for i, listen in enumerate(listens, 1):
            state.masters.append(services.start_master(
                cfg, state.token, listen, services.master_config_path(cfg, i), i,
                f"m{i}" if len(listens) > 1 else ""))
            state.save()
        state.server = services.master_url(listens[0], state.ca)
        state.save()
        if cfg.ssds:
            self._up_ssds(state)
        self.say(f"starting agents on {span(state.hosts)}")
        for i, host in enumerate(state.hosts, 1):
            services.write_node_config(cfg, host, i)
            host.agent_pid = services.start_agent(host)
            state.save()
        self.say(f"waiting for {len(state.hosts)} nodes Ready")
        services.wait_nodes(state.server, state.token, state.masters, state.hosts,
                            ca=state.ca)

    def _up_ssds(self, state: LabState) -> None:
        """Each host's loop devices over sparse files in its directory (its SSDs)."""
        cfg = self.config
        self.say(f"attaching {cfg.ssds} loop device(s) of {cfg.ssd_size >> 20} MiB (sparse) "
                 f"to each of {span(state.hosts)}")
        for host in state.hosts:
            for n in range(1, cfg.ssds + 1):
                disk = LoopDisk(str(Path(host.root) / f"ssd{n}.img"))
                host.ssds.append(disk)
                state.save()
                disk.device = system.attach_loop(Path(disk.file), cfg.ssd_size)
                state.save()

    # -- status -----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Hosts, etcd, registry and masters, checked now (JSON-ready)."""
        s = self._state()
        hosts = []
        for h in s.hosts:
            flags = [f for f, on in (("killed", h.killed), ("partitioned", h.partitioned)) if on]
            hosts.append({
                "name": h.name, "address": h.address, "netns": h.netns, "engine_url": h.engine,
                "engine": services.engine_ready(h),
                "agent": system.owned(h.agent_pid, h.node_config),
                "dockerd_pid": h.dockerd_pid, "agent_pid": h.agent_pid,
                "state": ",".join(flags) or "up",
            })
        etcd = reg = None
        if s.etcd:
            etcd = {"pid": s.etcd.pid, "endpoints": s.etcd.endpoints,
                    "alive": system.owned(s.etcd.pid, s.etcd.data_dir)}
        if s.registry:
            answer = system.http_get(f"http://{s.registry.addr}/v2/", timeout=2)
            reg = {"pid": s.registry.pid, "addr": s.registry.addr,
                   "alive": system.owned(s.registry.pid, s.registry.config),
                   "answers": answer is not None and answer[0] == 200}
        masters = []
        roles = services.master_roles(s.masters, s.token, s.ca) if s.token else {}
        for m in s.masters:
            answer = system.http_get(f"{services.master_url(m.listen, s.ca)}/healthz",
                                     timeout=2, ca=s.ca)
            alive = system.owned(m.pid, m.config)
            masters.append({"pid": m.pid, "listen": m.listen, "config": m.config,
                            "url": services.master_url(m.listen, s.ca),
                            "alive": alive,
                            "healthy": answer is not None and answer[0] == 200,
                            "role": roles.get(m.listen, "") if alive else ""})
        return {"name": s.name, "dir": s.dir, "ready": s.ready, "server": s.server, "ca": s.ca,
                "image": s.image, "redis_image": s.redis_image, "bridge": s.bridge,
                "bridge_ip": s.bridge_ip,
                "hosts": hosts, "etcd": etcd, "registry": reg, "masters": masters}

    # -- failures ---------------------------------------------------------------------------

    def kill_host(self, name: str) -> None:
        """Power loss: SIGKILL everything of host `name`, containers included."""
        s = self._state()
        host = s.host(name)
        pids = teardown.kill_host_processes(host)
        host.killed = True
        s.save()
        self.say(f"{name}: killed {len(pids)} processes (agent, dockerd, containerd, shims, "
                 "containers)")

    def partition(self, name: str) -> None:
        """Cut host `name`'s underlay link (the root side of its veth)."""
        s = self._state()
        host = s.host(name)
        net.set_link(host.veth, up=False)
        host.partitioned = True
        s.save()
        self.say(f"{name}: link {host.veth} is down ({host.address} cut off)")

    def heal(self, name: str) -> bool:
        """Undo partition and kill; False if `name` was healthy."""
        s = self._state()
        host = s.host(name)
        if not host.killed and not host.partitioned:
            return False
        if host.partitioned:
            net.set_link(host.veth, up=True)
            host.partitioned = False
            s.save()
            self.say(f"{name}: link {host.veth} is up")
        if host.killed:
            self.say(f"{name}: starting dockerd")
            # dockerd refuses a pid file naming any /proc entry: a killed one may linger
            # as a zombie until init reaps it.
            teardown.remove_stale_pidfiles(host)
            services.cap_host(host)
            s.save()
            proc = services.dockerd(host, s.registry.addr if s.registry else
                                    self.config.registry_addr, self.tls_root)
            proc.start()
            assert proc.proc is not None
            host.dockerd_pid = proc.proc.pid
            s.save()
            services.wait_dockerds([proc])
            host.agent_pid = services.start_agent(host)
            host.killed = False
            s.save()
            if s.masters and s.token:
                self.say(f"{name}: agent started; waiting for the node Ready")
                services.wait_nodes(s.server, s.token, s.masters, [host], timeout=30,
                                    ca=s.ca)
        return True

    def restart_agent(self, name: str, sigmad: str = "") -> None:
        """Stop host `name`'s node agent (SIGTERM) and start a new one: its set-up must be
        idempotent, so traffic keeps flowing. With `sigmad`, the new one runs that executable
        (an installed one: an upgrade) instead of this tree."""
        s = self._state()
        host = s.host(name)
        if host.killed:
            raise LabError(f"{name} is killed: run 'sigmad lab heal {name}' instead")
        if host.agent_pid and system.owned(host.agent_pid, host.node_config):
            system.stop([host.agent_pid], timeout=20)
        host.agent_pid = services.start_agent(host, sigmad)
        s.save()
        self.say(f"{name}: agent restarted (pid {host.agent_pid})")

    # -- down -------------------------------------------------------------------------------

    def down(self) -> bool:
        """Remove exactly what `up` made (also of a half-built lab); False if there is none."""
        s = self.state or LabState.load(self.root)
        if s is None:
            return False
        self.state = s
        teardown.stop_processes(s, self.say)
        problems = teardown.remove_system_objects(s, self.say)
        roots = [s.dir, *(h.exec_root for h in s.hosts)]
        if system.mounts_under(roots):
            problems.append(f"mounts remain under {', '.join(roots)}: files kept")
        else:
            problems += teardown.remove_files(s)
        if problems:
            raise LabError("down left some things behind (run it again):\n  " +
                           "\n  ".join(problems))
        self.state = None
        self.say(f"lab {s.name} is down")
        return True
