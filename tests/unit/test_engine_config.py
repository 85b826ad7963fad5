"""Instance → Docker create body, and inspect data → the one authoritative end reason."""

from __future__ import annotations

from typing import Any

import pytest

from sigmad.engine import (
    DEFAULT_PIDS_LIMIT,
    LABEL_APP,
    LABEL_CONTAINER,
    LABEL_GENERATION,
    LABEL_HOST_PORTS,
    LABEL_INDEX,
    LABEL_INSTANCE,
    LABEL_NAMESPACE,
    UNCAPPED_MEMORY,
    ContainerState,
    cap_config,
    container_config,
    container_name,
    pull_params,
)
from sigmad.models import Instance
from sigmad.spec import (
    AppSpec,
    ContainerSpec,
    NetworkSpec,
    Port,
    Resources,
    ResourceSpec,
    validate,
)


def make(
    limit: Resources | None = None,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[Instance, AppSpec, ContainerSpec]:
    container = ContainerSpec(
        name="main",
        image="busybox:1.36",
        command=command or [],
        env=env or {},
        resources=ResourceSpec(request=Resources(100, 2**20), limit=limit or Resources()),
    )
    app = AppSpec(app="web", namespace="prod", containers=[container])
    inst = Instance(namespace="prod", app="web", index=3, generation=9, ip="10.244.1.7")
    return inst, app, container


def test_labels_identify_the_instance():
    cfg = container_config(*make())
    assert cfg["Labels"] == {
        LABEL_INSTANCE: "prod/web-3",
        LABEL_APP: "web",
        LABEL_NAMESPACE: "prod",
        LABEL_INDEX: "3",
        LABEL_CONTAINER: "main",
        LABEL_GENERATION: "9",
    }
    assert LABEL_INSTANCE == "sigma.instance"
    assert LABEL_APP == "sigma.app"
    assert LABEL_NAMESPACE == "sigma.namespace"
    assert LABEL_CONTAINER == "sigma.container"
    assert LABEL_GENERATION == "sigma.generation"
    assert all(isinstance(v, str) for v in cfg["Labels"].values())


def test_image_and_hostname():
    cfg = container_config(*make())
    assert cfg["Image"] == "busybox:1.36"
    assert cfg["Hostname"] == "web-3"


def test_cpu_limit_to_nano_cpus():
    cfg = container_config(*make(limit=Resources(cpu_m=500)))
    assert cfg["HostConfig"]["NanoCpus"] == 500_000_000
    assert "Memory" not in cfg["HostConfig"]
    assert "MemorySwap" not in cfg["HostConfig"]


def test_whole_cpus_to_nano_cpus():
    cfg = container_config(*make(limit=Resources(cpu_m=2000)))
    assert cfg["HostConfig"]["NanoCpus"] == 2_000_000_000


def test_memory_limit_without_swap():
    cfg = container_config(*make(limit=Resources(memory=128 * 2**20)))
    assert cfg["HostConfig"]["Memory"] == 134217728
    assert cfg["HostConfig"]["MemorySwap"] == 134217728
    assert "NanoCpus" not in cfg["HostConfig"]


def test_zero_limit_sets_no_caps_and_swap_stays_off():
    cfg = container_config(*make(limit=Resources(0, 0)))
    assert cfg["HostConfig"] == {"PidsLimit": DEFAULT_PIDS_LIMIT, "NetworkMode": "sigma",
                                 "MemorySwappiness": 0}


def test_a_live_update_lifts_a_cap_with_the_values_that_mean_none():
    host = Resources(4000, 8 * 2**30)
    assert cap_config(Resources(0, 0), host) == {
        "NanoCpus": 4_000_000_000, "Memory": UNCAPPED_MEMORY, "MemorySwap": UNCAPPED_MEMORY}
    assert cap_config(Resources(500, 2**27), host) == {
        "NanoCpus": 500_000_000, "Memory": 2**27, "MemorySwap": 2**27}
    assert cap_config(Resources(0, 0)) == {}


def test_request_does_not_become_a_cap():
    # The request (100m, 1Mi in make()) is for accounting only; caps come from limits.
    cfg = container_config(*make())
    assert "NanoCpus" not in cfg["HostConfig"]
    assert "Memory" not in cfg["HostConfig"]


def test_limits_from_a_parsed_spec():
    app = validate({"app": "web", "containers": [{
        "name": "main", "image": "busybox",
        "resources": {"limit": {"cpu": "500m", "memory": "128Mi"}},
    }]})
    inst = Instance(namespace="default", app="web", index=0, generation=1, ip="10.244.0.9")
    cfg = container_config(inst, app, app.containers[0])
    assert cfg["HostConfig"] == {
        "NanoCpus": 500_000_000, "Memory": 134217728, "MemorySwap": 134217728,
        "MemorySwappiness": 0, "PidsLimit": DEFAULT_PIDS_LIMIT, "NetworkMode": "sigma",
    }


def test_command_replaces_entrypoint():
    cfg = container_config(*make(command=["httpd", "-f", "-p", "8080"]))
    assert cfg["Entrypoint"] == ["httpd"]
    assert cfg["Cmd"] == ["-f", "-p", "8080"]


def test_single_word_command():
    cfg = container_config(*make(command=["sleep"]))
    assert cfg["Entrypoint"] == ["sleep"]
    assert cfg["Cmd"] == []


def test_no_command_keeps_image_defaults():
    cfg = container_config(*make())
    assert "Entrypoint" not in cfg
    assert "Cmd" not in cfg


def test_env_sorted_then_sigma_variables():
    cfg = container_config(*make(env={"ZED": "z", "ALPHA": "a=b", "MID": ""}))
    assert cfg["Env"] == [
        "ALPHA=a=b",
        "MID=",
        "ZED=z",
        "SIGMA_INSTANCE=web-3",
        "SIGMA_APP=web",
        "SIGMA_NAMESPACE=prod",
        "SIGMA_INDEX=3",
    ]


def test_env_without_user_variables():
    cfg = container_config(*make())
    assert cfg["Env"] == [
        "SIGMA_INSTANCE=web-3", "SIGMA_APP=web", "SIGMA_NAMESPACE=prod", "SIGMA_INDEX=3",
    ]


def test_container_name_is_deterministic():
    inst, _, _ = make()
    assert container_name(inst, "main") == "sigma-prod_web-3_main"
    assert container_name(inst, "side") != container_name(inst, "main")
    other = Instance(namespace="dev", app="web", index=3, generation=9, ip="10.244.1.8")
    assert container_name(other, "main") != container_name(inst, "main")


@pytest.mark.parametrize(("a", "b"), [
    (("a-b", "c", 0, "m"), ("a", "b-c", 0, "m")),  # the same name with '-' separators
    (("a", "b", 1, "c-d"), ("a", "b-1-c", 0, "d")),  # ... and again
    (("a", "b-1", 2, "m"), ("a", "b", 1, "2-m")),
])
def test_container_names_of_different_instances_never_collide(a, b):
    def name(ns: str, app: str, index: int, container: str) -> str:
        inst = Instance(namespace=ns, app=app, index=index, generation=1, ip="10.244.0.1")
        return container_name(inst, container)

    assert name(*a) != name(*b)


@pytest.mark.parametrize(("ref", "params"), [
    ("busybox", {"fromImage": "busybox", "tag": "latest"}),
    ("busybox:1.36", {"fromImage": "busybox", "tag": "1.36"}),
    ("reg:5000/team/app", {"fromImage": "reg:5000/team/app", "tag": "latest"}),
    ("reg:5000/team/app:v1", {"fromImage": "reg:5000/team/app", "tag": "v1"}),
    ("app@sha256:" + "a" * 64, {"fromImage": "app", "tag": "sha256:" + "a" * 64}),
    ("reg:5000/app:v1@sha256:" + "b" * 64, {"fromImage": "reg:5000/app",
                                           "tag": "sha256:" + "b" * 64}),
])
def test_pull_params_of_every_reference_form(ref, params):
    assert pull_params(ref) == params


def test_a_query_value_with_a_newline_is_encoded():
    from sigmad.engine import _query

    assert _query({"name": "sigma-a_b-0_c"}) == "?name=sigma-a_b-0_c"
    assert _query({"name": "web\n"}) == "?name=web%0A"  # never raw in the request line


# --- inspect → ContainerState ------------------------------------------------------------------


def inspect_data(**state: Any) -> dict[str, Any]:
    return {
        "Id": "f00d",
        "Name": "/sigma-prod-web-3-main",
        "Config": {"Labels": {LABEL_INSTANCE: "prod/web-3", LABEL_CONTAINER: "main"}},
        "State": {
            "Status": "exited", "Running": False, "ExitCode": 0, "OOMKilled": False,
            "Error": "", "StartedAt": "2024-01-01T00:00:00Z",
            "FinishedAt": "2024-01-01T00:05:00Z", "Pid": 0, **state,
        },
        "NetworkSettings": {"Networks": {
            "none": {"IPAddress": ""},
            "sigma": {"IPAddress": "10.244.0.7"},
        }},
    }


def test_from_inspect_fields():
    st = ContainerState.from_inspect(inspect_data(Running=True, Status="running", Pid=4242))
    assert st.id == "f00d"
    assert st.name == "sigma-prod-web-3-main"
    assert st.labels == {LABEL_INSTANCE: "prod/web-3", LABEL_CONTAINER: "main"}
    assert st.running is True
    assert st.status == "running"
    assert st.pid == 4242
    assert st.ip == "10.244.0.7"
    assert st.started_at == "2024-01-01T00:00:00Z"
    assert st.finished_at == "2024-01-01T00:05:00Z"


def test_from_inspect_tolerates_missing_sections():
    st = ContainerState.from_inspect({"Id": "x", "State": None, "Config": None,
                                      "NetworkSettings": None})
    assert st.id == "x"
    assert st.name == ""
    assert st.labels == {}
    assert st.running is False
    assert st.exit_code == 0
    assert st.oom_killed is False
    assert st.error == ""
    assert st.ip == ""
    assert st.end_reason() == "Exited(0)"


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        ({"OOMKilled": True, "ExitCode": 137}, "OOMKilled"),
        ({"OOMKilled": True, "ExitCode": 0}, "OOMKilled"),
        ({"OOMKilled": True, "ExitCode": 1, "Error": "boom"}, "OOMKilled"),
        ({"ExitCode": 137}, "Signaled(SIGKILL)"),
        ({"ExitCode": 143}, "Signaled(SIGTERM)"),
        ({"ExitCode": 130}, "Signaled(SIGINT)"),
        ({"ExitCode": 139}, "Signaled(SIGSEGV)"),
        ({"ExitCode": 3}, "Exited(3)"),
        ({"ExitCode": 1}, "Exited(1)"),
        ({"ExitCode": 0}, "Exited(0)"),
        ({"ExitCode": 128}, "Exited(128)"),
        ({"ExitCode": 255}, "Exited(255)"),  # 255 - 128 = 127 is no signal
        ({"ExitCode": None}, "Exited(0)"),
        (
            {"ExitCode": 127, "Error": 'exec: "nope": executable file not found in $PATH'},
            'FailedToStart(exec: "nope": executable file not found in $PATH)',
        ),
        ({"ExitCode": 0, "Error": "no such image"}, "FailedToStart(no such image)"),
    ],
)
def test_end_reason(state, reason):
    assert ContainerState.from_inspect(inspect_data(**state)).end_reason() == reason


def test_the_network_owner_joins_the_overlay_with_its_ip_and_derived_mac() -> None:
    inst, app, container = make()
    config = container_config(inst, app, container)
    assert config["HostConfig"]["NetworkMode"] == "sigma"
    assert config["MacAddress"] == "0a:58:0a:f4:01:07"
    endpoint = config["NetworkingConfig"]["EndpointsConfig"]["sigma"]
    assert endpoint == {"IPAMConfig": {"IPv4Address": "10.244.1.7"}}
    joined = container_config(inst, app, container, network_of="abc")
    assert joined["HostConfig"]["NetworkMode"] == "container:abc"
    assert "NetworkingConfig" not in joined and "MacAddress" not in joined


def test_host_compat_publishes_the_host_port_on_itself_and_labels_it():
    inst, app, container = make()
    app.network = NetworkSpec("host-compat", [Port("sql", 0), Port("stats", 0, "udp")])
    inst.host_ports = {"sql": 31005, "stats": 31002}
    cfg = container_config(inst, app, container, host_ip="10.0.0.5")
    assert cfg["HostConfig"]["PortBindings"] == {
        "31005/tcp": [{"HostPort": "31005"}], "31002/udp": [{"HostPort": "31002"}]}
    assert cfg["Labels"][LABEL_HOST_PORTS] == "31002/udp,31005/tcp"
    assert {"SIGMA_HOST_IP=10.0.0.5", "SIGMA_HOST_PORT_SQL=31005",
            "SIGMA_HOST_PORT_STATS=31002"} <= set(cfg["Env"])
    # the containers that join the first one's network carry no label
    assert LABEL_HOST_PORTS not in container_config(inst, app, container,
                                                     network_of="abc")["Labels"]
    # an overlay app's ports map host port → container port, unlabelled
    app.network = NetworkSpec("overlay", [Port("sql", 3306), Port("stats", 9125, "udp")])
    cfg = container_config(inst, app, container)
    assert cfg["HostConfig"]["PortBindings"] == {
        "3306/tcp": [{"HostPort": "31005"}], "9125/udp": [{"HostPort": "31002"}]}
    assert LABEL_HOST_PORTS not in cfg["Labels"]
