"""The app spec parser: good specs parse to typed values, bad ones name the field and reason."""

from __future__ import annotations

import textwrap

import pytest

from sigmad.errors import SpecError
from sigmad.spec import (
    AppSpec,
    ContainerSpec,
    Placement,
    Resources,
    ResourceSpec,
    VolumeSpec,
    parse,
    validate,
)

FULL = """
app: web
namespace: prod
replicas: 3
containers:
  - name: main
    image: lab-registry:5000/sigma/busybox:latest
    command: [httpd, -f, -p, 8080]
    env: {MODE: prod, PORT: 8080, DEBUG: true, RATIO: 0.5}
    resources:
      request: {cpu: "1", memory: 2Gi}
      limit: {cpu: "4", memory: 8Gi}
  - name: sidecar
    image: busybox
    resources:
      request: {cpu: 250m, memory: 64Mi}
      limit: {cpu: 0.5, memory: 128M}
placement:
  labels: {zone: bj-1, disk: ssd}
restart: on-failure
"""

MINIMAL = """
app: web
containers:
  - name: main
    image: busybox
"""


def error_of(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(textwrap.dedent(text))
    return info.value


def invalid(**overrides: object) -> SpecError:
    """The error of validating a minimal good document with `overrides` applied."""
    doc: dict[str, object] = {"app": "web", "containers": [{"name": "main", "image": "busybox"}]}
    doc.update(overrides)
    with pytest.raises(SpecError) as info:
        validate(doc)
    return info.value


def container_error(**fields: object) -> SpecError:
    """The error of a spec whose only container has `fields` on top of name and image."""
    container: dict[str, object] = {"name": "main", "image": "busybox"}
    container.update(fields)
    return invalid(containers=[container])


# --- good specs ---------------------------------------------------------------------------


def test_full_spec_parses_every_field():
    (spec,) = parse(FULL)
    assert spec == AppSpec(
        app="web",
        namespace="prod",
        replicas=3,
        containers=[
            ContainerSpec(
                name="main",
                image="lab-registry:5000/sigma/busybox:latest",
                command=["httpd", "-f", "-p", "8080"],
                env={"MODE": "prod", "PORT": "8080", "DEBUG": "true", "RATIO": "0.5"},
                resources=ResourceSpec(
                    request=Resources(cpu_m=1000, memory=2 * 2**30),
                    limit=Resources(cpu_m=4000, memory=8 * 2**30),
                ),
            ),
            ContainerSpec(
                name="sidecar",
                image="busybox",
                resources=ResourceSpec(
                    request=Resources(cpu_m=250, memory=64 * 2**20),
                    limit=Resources(cpu_m=500, memory=128_000_000),
                ),
            ),
        ],
        placement=Placement(labels={"zone": "bj-1", "disk": "ssd"}),
        restart="on-failure",
    )
    assert spec.key == "prod/web"


def test_env_values_are_stringified():
    (spec,) = parse(FULL)
    env = spec.containers[0].env
    assert all(isinstance(v, str) for v in env.values())
    assert env["PORT"] == "8080"
    assert env["DEBUG"] == "true"  # YAML booleans in their YAML spelling, not Python's "True"


def test_command_numbers_are_stringified():
    (spec,) = parse(FULL)
    assert spec.containers[0].command == ["httpd", "-f", "-p", "8080"]


def test_request_sums_container_requests():
    (spec,) = parse(FULL)
    assert spec.request() == Resources(cpu_m=1250, memory=2 * 2**30 + 64 * 2**20)


def test_minimal_spec_takes_defaults():
    (spec,) = parse(MINIMAL)
    assert spec.namespace == "default"
    assert spec.replicas == 1
    assert spec.restart == "always"
    assert spec.placement == Placement(labels={})
    assert spec.key == "default/web"
    (c,) = spec.containers
    assert c.command == []
    assert c.env == {}
    assert c.resources == ResourceSpec(Resources(0, 0), Resources(0, 0))
    assert spec.request() == Resources(0, 0)


def test_json_input_parses():
    (spec,) = parse('{"app": "web", "containers": [{"name": "main", "image": "busybox"}]}')
    assert spec.app == "web"


def test_replicas_zero_and_max_are_allowed():
    assert validate({"app": "a", "replicas": 0, "containers": [{"name": "m", "image": "i"}]})\
        .replicas == 0
    assert validate({"app": "a", "replicas": 10000, "containers": [{"name": "m", "image": "i"}]})\
        .replicas == 10000


def test_limit_may_exceed_request_and_zero_limit_means_no_cap():
    spec = validate({"app": "a", "containers": [{
        "name": "m", "image": "i",
        "resources": {"request": {"cpu": "2", "memory": "1Gi"}},
    }]})
    res = spec.containers[0].resources
    assert res.request == Resources(2000, 2**30)
    assert res.limit == Resources(0, 0)


def test_name_at_max_length_is_accepted():
    assert validate({"app": "a" * 40, "containers": [{"name": "m", "image": "i"}]}).app == "a" * 40


def test_multi_document_yaml():
    specs = parse(MINIMAL + "---\n" + MINIMAL.replace("app: web", "app: api") + "---\n")
    assert [s.key for s in specs] == ["default/web", "default/api"]


def test_same_app_in_two_namespaces_is_fine():
    specs = parse(MINIMAL + "---\n" + MINIMAL + "namespace: other\n")
    assert [s.key for s in specs] == ["default/web", "other/web"]


# --- bad quantities -----------------------------------------------------------------------


def test_bad_memory_names_path_and_value():
    err = error_of("""
        app: web
        containers:
          - name: main
            image: busybox
            resources:
              limit: {memory: 8GG}
        """)
    assert err.field == "containers[0].resources.limit.memory"
    assert 'containers[0].resources.limit.memory: "8GG" is not a size' in err.message


def test_bad_cpu_names_path_and_value():
    err = container_error(resources={"request": {"cpu": "abc"}})
    assert err.field == "containers[0].resources.request.cpu"
    assert 'containers[0].resources.request.cpu: "abc" is not a cpu quantity' in err.message


def test_fractional_bytes_rejected():
    err = container_error(resources={"request": {"memory": "1.5"}})
    assert err.field == "containers[0].resources.request.memory"
    assert "whole number of bytes" in err.message


@pytest.mark.parametrize("key", ["cpu", "memory"])
def test_limit_below_request(key):
    values = {"cpu": ("2", "1"), "memory": ("2Gi", "1Gi")}[key]
    err = container_error(resources={"request": {key: values[0]}, "limit": {key: values[1]}})
    assert err.field == f"containers[0].resources.limit.{key}"
    assert "below the request" in err.message


def test_unknown_resource_key():
    err = container_error(resources={"request": {"gpu": 1}})
    assert err.field == "containers[0].resources.request.gpu"
    assert "unknown field" in err.message


# --- unknown and not-yet-supported fields --------------------------------------------------


def test_unknown_top_level_field():
    err = invalid(replica=3)
    assert err.field == "replica"
    assert err.message == "replica: unknown field"


def test_unknown_nested_field_in_second_container():
    err = invalid(containers=[
        {"name": "a", "image": "busybox"},
        {"name": "b", "imagee": "busybox", "image": "busybox"},
    ])
    assert err.field == "containers[1].imagee"
    assert err.message == "containers[1].imagee: unknown field"


def test_unknown_placement_field():
    err = invalid(placement={"lables": {"a": "b"}})
    assert err.field == "placement.lables"
    assert "unknown field" in err.message


def test_volumes_parse() -> None:
    spec = validate({"app": "db", "containers": [{"name": "main", "image": "busybox"}],
                     "volumes": [{"name": "data", "ssd": 1, "min_size": "10Gi",
                                  "mount": "/data/", "reclaim": "retain"},
                                 {"name": "log", "ssd": 1, "mount": "/var//log/db"}]})
    assert spec.volumes == [VolumeSpec("data", "/data", 1, 10 << 30, "retain"),
                            VolumeSpec("log", "/var/log/db", 1, 0, "wipe")]


@pytest.mark.parametrize(("volumes", "field", "text"), [
    ([{"name": "data", "ssd": -1, "mount": "/data"}], "volumes[0].ssd", "must be 1"),
    ([{"name": "data", "ssd": 2, "mount": "/data"}], "volumes[0].ssd", "must be 1"),
    ([{"name": "data", "ssd": True, "mount": "/data"}], "volumes[0].ssd", "must be 1"),
    ([{"name": "data", "mount": "/data"}], "volumes[0].ssd", "is required"),
    ([{"name": "data", "ssd": 1, "mount": "data"}], "volumes[0].mount", "not an absolute"),
    ([{"name": "data", "ssd": 1, "mount": "/"}], "volumes[0].mount", "onto /"),
    ([{"name": "data", "ssd": 1, "mount": "//./"}], "volumes[0].mount", "onto /"),
    ([{"name": "data", "ssd": 1, "mount": "/a/../etc"}], "volumes[0].mount", "'..'"),
    ([{"name": "data", "ssd": 1, "mount": "/proc/x"}], "volumes[0].mount", "runtime's own"),
    ([{"name": "data", "ssd": 1, "mount": "/d:ro"}], "volumes[0].mount", "':'"),
    ([{"name": "data", "ssd": 1}], "volumes[0].mount", "is required"),
    ([{"name": "data", "ssd": 1, "mount": "/a"}, {"name": "data", "ssd": 1, "mount": "/b"}],
     "volumes[1].name", "used twice"),
    ([{"name": "a", "ssd": 1, "mount": "/a"}, {"name": "b", "ssd": 1, "mount": "/a/b"}],
     "volumes[1].mount", "overlaps"),
    ([{"name": "data", "ssd": 1, "mount": "/d", "min_size": "10GG"}], "volumes[0].min_size",
     "not a size"),
    ([{"name": "data", "ssd": 1, "mount": "/d", "reclaim": "keep"}], "volumes[0].reclaim",
     "not one of wipe, retain"),
    ([{"name": "Data", "ssd": 1, "mount": "/d"}], "volumes[0].name", "not a valid name"),
    ([{"name": "data", "ssd": 1, "mount": "/d", "size": 1}], "volumes[0].size", "unknown"),
    ({"name": "data"}, "volumes", "must be a list"),
])
def test_bad_volumes_name_the_field(volumes: object, field: str, text: str) -> None:
    err = invalid(volumes=volumes)
    assert err.field == field and text in err.message, err.message


def test_not_yet_field_only_where_design_puts_it():
    # `ready` is a container field in DESIGN; at the top level it is simply unknown.
    err = invalid(ready={"tcp": 1})
    assert err.message == "ready: unknown field"


# --- missing and malformed structure -------------------------------------------------------


def test_missing_app():
    with pytest.raises(SpecError) as info:
        validate({"containers": [{"name": "m", "image": "i"}]})
    assert info.value.field == "app"
    assert info.value.message == "app: is required"


def test_missing_containers():
    with pytest.raises(SpecError) as info:
        validate({"app": "web"})
    assert info.value.field == "containers"
    assert info.value.message == "containers: is required"


def test_missing_image():
    err = invalid(containers=[{"name": "main"}])
    assert err.field == "containers[0].image"
    assert err.message == "containers[0].image: is required"


def test_missing_container_name():
    err = invalid(containers=[{"image": "busybox"}])
    assert err.field == "containers[0].name"
    assert "is required" in err.message


@pytest.mark.parametrize("value", [[], {}, "main", None])
def test_containers_must_be_non_empty_list(value):
    err = invalid(containers=value)
    assert err.field == "containers"
    assert "must be a non-empty list" in err.message


def test_container_that_is_not_a_mapping():
    err = invalid(containers=["busybox"])
    assert err.field == "containers[0]"
    assert "must be a mapping, got a string" in err.message


def test_duplicate_container_names():
    err = invalid(containers=[
        {"name": "main", "image": "a"},
        {"name": "side", "image": "b"},
        {"name": "main", "image": "c"},
    ])
    assert err.field == "containers[2].name"
    assert "'main' is used twice" in err.message


@pytest.mark.parametrize("image", ["", "busy box", 42])
def test_bad_image(image):
    err = container_error(image=image)
    assert err.field == "containers[0].image"
    assert "is not an image reference" in err.message


@pytest.mark.parametrize("command", ["httpd -f", [["httpd"]], [{"a": 1}]])
def test_bad_command(command):
    err = container_error(command=command)
    assert err.field == "containers[0].command"
    assert "must be a list of strings" in err.message


@pytest.mark.parametrize("name", ["Web", "a" * 41, "-web", "web-", "we_b", "", 7])
def test_bad_app_name(name):
    err = invalid(app=name)
    assert err.field == "app"
    assert "is not a valid name" in err.message
    assert repr(name) in err.message


def test_bad_namespace_and_container_names():
    assert invalid(namespace="Prod").field == "namespace"
    assert invalid(containers=[{"name": "Main", "image": "i"}]).field == "containers[0].name"


@pytest.mark.parametrize("replicas", [-1, True, "3", 10001, 1.5, None])
def test_bad_replicas(replicas):
    err = invalid(replicas=replicas)
    assert err.field == "replicas"
    assert "is not a whole number from 0 to 10000" in err.message


@pytest.mark.parametrize("key", ["1BAD", "BAD-NAME", "A B", ""])
def test_bad_env_name(key):
    err = container_error(env={key: "x"})
    assert err.field == f"containers[0].env.{key}"
    assert "is not a valid environment variable name" in err.message


def test_env_value_mapping():
    err = container_error(env={"A": {"b": 1}})
    assert err.field == "containers[0].env.A"
    assert "must be a string, got a mapping" in err.message


def test_env_value_list():
    err = container_error(env={"A": [1, 2]})
    assert err.field == "containers[0].env.A"
    assert "must be a string, got a list" in err.message


def test_env_not_a_mapping():
    err = container_error(env=["A=1"])
    assert err.field == "containers[0].env"
    assert "must be a mapping, got a list" in err.message


def test_bad_label_name():
    err = invalid(placement={"labels": {"-zone": "a"}})
    assert err.field == "placement.labels.-zone"
    assert "is not a valid label name" in err.message


@pytest.mark.parametrize("policy", ["Always", "sometimes", "", 1])
def test_bad_restart_policy(policy):
    err = invalid(restart=policy)
    assert err.field == "restart"
    assert "is not one of always, on-failure, never" in err.message


@pytest.mark.parametrize("policy", ["always", "on-failure", "never"])
def test_good_restart_policies(policy):
    doc = {"app": "a", "restart": policy, "containers": [{"name": "m", "image": "i"}]}
    assert validate(doc).restart == policy


# --- whole-file errors ---------------------------------------------------------------------


def test_invalid_yaml_names_the_line():
    err = error_of("app: web\ncontainers: [{name: a, image: x]\n")
    assert err.field == "spec"
    assert err.message.startswith("spec: is not valid YAML at line 2, column ")


def test_invalid_yaml_later_line():
    err = error_of("app: web\nreplicas: 2\ncontainers:\n  - name: a\n   image: x\n")
    assert "not valid YAML at line 5" in err.message


@pytest.mark.parametrize("text", ["", "   \n", "---\n", "# just a comment\n"])
def test_empty_file(text):
    err = error_of(text)
    assert err.field == "spec"
    assert err.message == "spec: holds no app"


def test_same_app_twice_in_one_file():
    err = error_of(MINIMAL + "---\n" + MINIMAL)
    assert err.field == "app"
    assert "default/web appears more than once in the file" in err.message


def test_top_level_list():
    err = error_of("- app: web\n  containers: [{name: a, image: x}]\n")
    assert err.field is None
    assert err.message == "must be a mapping, got a list"


def test_top_level_scalar():
    err = error_of("hello\n")
    assert err.message == "must be a mapping, got a string"


def test_error_in_second_document_names_the_document():
    err = error_of(MINIMAL + "---\napp: api\ncontainers:\n  - name: main\n")
    assert err.field == "containers[0].image"
    assert err.message == "document 2: containers[0].image: is required"


def test_error_in_single_document_has_no_document_prefix():
    err = error_of("app: api\ncontainers:\n  - name: main\n")
    assert err.message == "containers[0].image: is required"


def test_spec_error_is_an_api_400():
    err = invalid(bogus=1)
    assert err.status == 400
    assert err.to_dict() == {
        "error": {"code": "invalid", "message": "bogus: unknown field", "field": "bogus"}
    }


# --- hostile input (issue 16: every bad input is a 400 naming the field) -------------------


def test_an_alias_is_refused_at_its_field_and_never_expanded():
    err = error_of(MINIMAL + "x: &a [1, 2]\nnamespace: *a\n")
    assert err.field == "namespace"
    assert "is a YAML alias (*a): aliases are not accepted" in err.message
    # The billion laughs: 9 levels of 9 aliases would be 9^9 items once expanded.
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    err = error_of(MINIMAL + "\n".join(levels) + "\n")
    assert err.field == "a1[0]" and "is a YAML alias (*a0)" in err.message
    err = error_of("base: &b {app: web}\n<<: *b\ncontainers: [{name: m, image: busybox}]\n")
    assert "a merge key (<<) takes a YAML alias" in err.message


def test_nesting_is_bounded():
    err = error_of(MINIMAL + "env: " + "[" * 500 + "]" * 500 + "\n")
    assert err.field == "spec" and "nested deeper than 16 levels" in err.message
    err = error_of("a:\n" + "".join("  " * i + f"- k{i}:\n" for i in range(1, 40)))
    assert "nested deeper than 16 levels" in err.message


def test_a_huge_integer_is_refused_at_its_field():
    err = error_of(MINIMAL + "replicas: " + "9" * 4301 + "\n")
    assert err.field == "replicas" and "is a number of 4301 characters: too large" in err.message
    err = error_of(MINIMAL.replace("busybox", "busybox\n    command: [1:" + "1:" * 3000 + "1]"))
    assert err.field == "containers[0].command[0]"


@pytest.mark.parametrize(("value", "field"), [
    ("!!int abc", "replicas"), ("!!float x", "replicas"), ("!!timestamp now", "replicas"),
    ("!!int ''", "replicas"),
])
def test_a_value_that_fails_its_tag_is_refused_at_its_field(value, field):
    err = error_of(MINIMAL + f"replicas: {value}\n")
    assert err.field == field and "is not a valid" in err.message


def test_documents_per_file_are_bounded():
    err = error_of("---\n".join([MINIMAL.replace("web", f"web{i}") for i in range(101)]))
    assert "more than 100 documents in one file" in err.message
    assert len(parse("---\n".join([MINIMAL.replace("web", f"w{i}") for i in range(100)]))) == 100


@pytest.mark.parametrize("name", ["web\n", "web\n\n", "\nweb", "we\nb"])
def test_names_are_matched_whole(name):
    assert invalid(app=name).field == "app"
    assert invalid(namespace=name).field == "namespace"
    assert container_error(env={name: "x"}).field == f"containers[0].env.{name}"
    assert invalid(placement={"labels": {name: "x"}}).field == f"placement.labels.{name}"


@pytest.mark.parametrize("image", [
    "busybox", "busybox:1.36", "lab-registry:5000/sigma/busybox:latest", "localhost/a_b/c__d",
    "registry.example.com:443/team/app-x.y:v1.2-rc_3", "[::1]:5000/busybox",
    "busybox@sha256:" + "a" * 64, "reg:5000/b:v1@sha256:" + "0" * 64, "a" * 255,
])
def test_good_image_references(image):
    assert validate({"app": "a", "containers": [{"name": "m", "image": image}]}) \
        .containers[0].image == image


@pytest.mark.parametrize("image", [
    "Busybox", "busybox:", ":tag", "busybox::1", "-busybox", "busybox/", "a//b", "a/-b",
    "busybox@sha256:abc", "busybox:" + "t" * 129, "http://reg/busybox", "busybox\n",
    "busybox:1\n", "a" * 256, "a/" * 300 + "a", "reg:port/busybox", "busy$box",
])
def test_bad_image_references(image):
    err = container_error(image=image)
    assert err.field == "containers[0].image"
    assert "is not an image reference" in err.message
    assert len(err.message) < 200  # a long value is quoted cut short


def test_fixed_ips_are_one_per_replica_and_checked_in_linear_time():
    ips = [f"10.244.{i // 250}.{i % 250 + 1}" for i in range(10_000)]
    spec = validate({"app": "a", "replicas": 10_000, "network": {"ip": ips},
                     "containers": [{"name": "m", "image": "busybox"}]})
    assert spec.network.ips == ips
    err = invalid(replicas=2, network={"ip": ips})
    assert err.field == "network.ip" and "10000 fixed IP(s) for 2 replicas" in err.message
    err = invalid(replicas=3, network={"ip": ["10.244.0.1", "10.244.0.2", "10.244.0.1"]})
    assert err.field == "network.ip[2]" and "10.244.0.1 is listed twice" in err.message


def test_port_names_are_checked_in_linear_time():
    ports = [{"name": f"p{i}", "container": 1 + i % 65535} for i in range(20_000)]
    assert len(validate({"app": "a", "network": {"ports": ports},
                         "containers": [{"name": "m", "image": "busybox"}]}).network.ports) \
        == 20_000


@pytest.mark.parametrize(("resources", "field"), [
    ({"limit": {"memory": 2**70}}, "containers[0].resources.limit.memory"),
    ({"limit": {"memory": "9" * 50 + "Gi"}}, "containers[0].resources.limit.memory"),
    ({"request": {"cpu": 10**20}}, "containers[0].resources.request.cpu"),
    ({"request": {"cpu": float("inf")}}, "containers[0].resources.request.cpu"),
    ({"request": {"cpu": float("nan")}}, "containers[0].resources.request.cpu"),
])
def test_quantities_are_bounded(resources, field):
    err = container_error(resources=resources)
    assert err.field == field


def test_host_compat_ports_serve_on_the_host_port_and_refuse_a_container_port():
    spec = validate({"app": "db", "containers": [{"name": "m", "image": "busybox"}],
                     "network": {"mode": "host-compat", "ports": [{"name": "my-sql"}]}})
    (port,) = spec.network.ports
    assert (port.name, port.container, port.protocol, port.env) == (
        "my-sql", 0, "tcp", "SIGMA_HOST_PORT_MY_SQL")
    err = invalid(network={"mode": "host-compat", "ports": [{"name": "sql", "container": 3306}]})
    assert err.field == "network.ports[0].container"
    assert "SIGMA_HOST_PORT_SQL" in err.message and "remove" in err.message
    # the overlay still maps a container port, and needs it
    err = invalid(network={"ports": [{"name": "sql"}]})
    assert err.field == "network.ports[0].container" and err.message.endswith("is required")
