"""`sigmad master` and `sigmad node` configuration files."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from sigmad.config import (
    DEFAULT_ENGINE,
    DEFAULT_ETCD,
    DEFAULT_LISTEN,
    DEFAULT_PREFIX,
    EtcdConfig,
    MasterConfig,
    load_master,
    load_node,
    master_config,
    node_config,
)
from sigmad.errors import SpecError
from sigmad.spec import Fields, Resources

TOKEN = "9f3c1e7a5b2d8046"  # exactly 16 characters, no pattern


def master(**doc: object) -> MasterConfig:
    return master_config(Fields("", doc, ""))


def master_error(**doc: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        master(**doc)
    return info.value


def node_error(**doc: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        node_config(Fields("", doc, ""))
    return info.value


# --- master ------------------------------------------------------------------------------------


def test_master_defaults():
    cfg = master(token=TOKEN)
    assert cfg == MasterConfig(
        token=TOKEN, listen=DEFAULT_LISTEN,
        etcd=EtcdConfig([DEFAULT_ETCD], DEFAULT_PREFIX), reconcile_interval=300.0,
    )
    assert DEFAULT_LISTEN == "127.0.0.1:7475"
    assert DEFAULT_ETCD == "http://127.0.0.1:2379"
    assert DEFAULT_PREFIX == "/sigma/v1"


def test_master_all_fields():
    cfg = master(
        token=TOKEN + "xyz", listen="0.0.0.0:8080",
        etcd={"endpoints": ["http://10.0.0.1:2379", "http://10.0.0.2:2379"], "prefix": "/t/v1"},
        reconcile_interval=0.5,
    )
    assert cfg.token == TOKEN + "xyz"
    assert cfg.listen == "0.0.0.0:8080"
    assert cfg.etcd == EtcdConfig(["http://10.0.0.1:2379", "http://10.0.0.2:2379"], "/t/v1")
    assert cfg.reconcile_interval == 0.5


def test_single_etcd_endpoint_string_becomes_a_list():
    assert master(token=TOKEN, etcd={"endpoints": "http://e:2379"}).etcd.endpoints == [
        "http://e:2379"
    ]


@pytest.mark.parametrize("token", [None, "", "short", TOKEN[:-1], 1234567890123456789])
def test_token_too_short_or_missing(token):
    doc = {} if token is None else {"token": token}
    err = master_error(**doc)
    assert err.field == "token"
    assert "at least 16 characters" in err.message


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_token_file_is_read_and_stripped(tmp_path: Path):
    path = private(tmp_path / "token", f"  {TOKEN}\n")
    assert master(token_file=str(path)).token == TOKEN


def test_token_wins_over_token_file(tmp_path: Path):
    path = private(tmp_path / "token", "f" * 32)
    assert master(token=TOKEN, token_file=str(path)).token == TOKEN


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o700 | 0o004])
def test_token_file_others_can_read_is_refused(tmp_path: Path, mode: int):
    path = private(tmp_path / "token", TOKEN)
    path.chmod(mode)
    err = master_error(token_file=str(path))
    assert err.field == "token_file"
    assert f"can be read by others (mode {mode:o}): chmod 600 {path}" in err.message
    path.chmod(0o400)
    assert master(token_file=str(path)).token == TOKEN


@pytest.mark.parametrize("token", [
    "change-me-0123456789abcdef",  # conf/master.yaml's
    "changeme-changeme-changeme", "replace-me-with-a-secret", "example-token-1234",
    "aaaaaaaaaaaaaaaaaaaaaaaa", "abcabcabcabcabcabcabc", "0123456789abcdef", "abcdefghijklmnop",
    "ponmlkjihgfedcba", "x" + "0123456789" + "zqwkp",
])
def test_placeholder_and_weak_tokens_are_refused(token: str):
    err = master_error(token=token)
    assert err.field == "token"
    assert err.message.endswith("generate one with 'openssl rand -hex 24'")


def test_a_weak_token_in_a_token_file_names_the_file_field(tmp_path: Path):
    path = private(tmp_path / "token", "change-me-0123456789abcdef\n")
    assert master_error(token_file=str(path)).field == "token_file"


def test_the_shipped_example_config_is_refused_until_its_token_is_changed():
    example = Path(__file__).parents[2] / "conf" / "master.yaml"
    with pytest.raises(SpecError) as info:
        load_master(example)
    assert info.value.field == "token" and "placeholder" in info.value.message


def test_token_file_with_short_token(tmp_path: Path):
    path = private(tmp_path / "token", "short\n")
    err = master_error(token_file=str(path))
    assert err.field == "token"


def test_token_file_missing(tmp_path: Path):
    missing = tmp_path / "nope"
    err = master_error(token_file=str(missing))
    assert err.field == "token_file"
    assert f"cannot read {missing}" in err.message
    assert "No such file or directory" in err.message


@pytest.mark.parametrize(
    "endpoints", ["127.0.0.1:2379", ["http://ok:2379", "bad"], [], [2379], None]
)
def test_bad_etcd_endpoint(endpoints):
    err = master_error(token=TOKEN, etcd={"endpoints": endpoints})
    assert err.field == "etcd.endpoints"
    assert "must be a list of URLs" in err.message


@pytest.mark.parametrize("prefix", ["sigma/v1", "", 5])
def test_bad_etcd_prefix(prefix):
    err = master_error(token=TOKEN, etcd={"prefix": prefix})
    assert err.field == "etcd.prefix"
    assert "starting with /" in err.message


def test_unknown_etcd_key():
    err = master_error(token=TOKEN, etcd={"endpoint": "http://e:2379"})
    assert err.field == "etcd.endpoint"
    assert "unknown field" in err.message


def test_etcd_must_be_a_mapping():
    err = master_error(token=TOKEN, etcd=["http://e:2379"])
    assert err.field == "etcd"
    assert "must be a mapping" in err.message


def test_unknown_master_key_rejected():
    err = master_error(token=TOKEN, listne="0.0.0.0:1")
    assert err.field == "listne"
    assert err.message == "listne: unknown field"


@pytest.mark.parametrize("listen", ["7475", 7475])
def test_bad_listen(listen):
    err = master_error(token=TOKEN, listen=listen)
    assert err.field == "listen"
    assert "HOST:PORT" in err.message


@pytest.mark.parametrize("interval", [0, 0.05, -1, "5", True])
def test_bad_reconcile_interval(interval):
    err = master_error(token=TOKEN, reconcile_interval=interval)
    assert err.field == "reconcile_interval"
    assert "must be a number of at least 0.1" in err.message


# --- node --------------------------------------------------------------------------------------


def test_node_defaults():
    cfg = node_config(Fields("", {}, ""))
    assert cfg.name == socket.gethostname()
    assert cfg.engine == DEFAULT_ENGINE == "unix:///var/run/docker.sock"
    assert cfg.address == ""
    assert cfg.labels == {}
    assert cfg.reserved == Resources(0, 0)
    assert cfg.heartbeat_ttl == 5
    assert cfg.etcd == EtcdConfig([DEFAULT_ETCD], DEFAULT_PREFIX)
    assert cfg.overlay_netfilter is False


def test_node_all_fields():
    cfg = node_config(Fields("", {
        "name": "host-1",
        "engine": "unix:///run/docker.sock",  # tcp:// needs engine_tls (tests/unit/test_tls.py)
        "address": "10.0.0.1",
        "labels": {"zone": "bj-1", "isp": "ctc", "ssd": True},
        "reserved": {"cpu": "500m", "memory": "1Gi"},
        "heartbeat_ttl": 10,
        "etcd": {"endpoints": ["http://10.0.0.9:2379"]},
    }, ""))
    assert cfg.name == "host-1"
    assert cfg.engine == "unix:///run/docker.sock"
    assert cfg.address == "10.0.0.1"
    assert cfg.labels == {"zone": "bj-1", "isp": "ctc", "ssd": "true"}
    assert cfg.reserved == Resources(cpu_m=500, memory=2**30)
    assert cfg.heartbeat_ttl == 10
    assert cfg.etcd.endpoints == ["http://10.0.0.9:2379"]


@pytest.mark.parametrize(
    ("reserved", "expected"),
    [
        ({"cpu": 1}, Resources(1000, 0)),
        ({"cpu": "0.25"}, Resources(250, 0)),
        ({"memory": "512Mi"}, Resources(0, 512 * 2**20)),
        ({"memory": 1024}, Resources(0, 1024)),
    ],
)
def test_node_reserved_parsed(reserved, expected):
    assert node_config(Fields("", {"reserved": reserved}, "")).reserved == expected


@pytest.mark.parametrize(
    ("reserved", "text"),
    [
        ({"cpu": "abc"}, '"abc" is not a cpu quantity'),
        ({"memory": "8GG"}, '"8GG" is not a size'),
    ],
)
def test_node_bad_reserved(reserved, text):
    err = node_error(reserved=reserved)
    assert err.field is not None and err.field.startswith("reserved")
    assert text in err.message


def test_node_unknown_reserved_key():
    err = node_error(reserved={"gpu": 1})
    assert err.field == "reserved.gpu"
    assert "unknown field" in err.message


@pytest.mark.parametrize("engine", ["/var/run/docker.sock", "docker.sock", "ssh://h", 2375])
def test_bad_engine_url(engine):
    err = node_error(engine=engine)
    assert err.field == "engine"
    assert "unix:///path/docker.sock or tcp://HOST:PORT" in err.message


def test_a_unix_socket_engine_needs_no_tls():
    engine = "unix:///run/docker.sock"
    assert node_config(Fields("", {"engine": engine}, "")).engine == engine


@pytest.mark.parametrize("engine", ["http://h:2375", "https://h:2376"])
def test_http_engine_urls_are_refused(engine):
    err = node_error(engine=engine)
    assert err.field == "engine"
    assert "(with engine_tls)" in err.message


def test_bad_node_label_name():
    err = node_error(labels={"bad label": "x"})
    assert err.field == "labels.bad label"
    assert "is not a valid label name" in err.message


def test_node_name_must_be_a_string():
    assert node_error(name=["a"]).field == "name"


@pytest.mark.parametrize("ttl", [1, 0, "5", False])
def test_bad_heartbeat_ttl(ttl):
    err = node_error(heartbeat_ttl=ttl)
    assert err.field == "heartbeat_ttl"
    assert "at least 2" in err.message


def test_node_ssds_and_data_dir():
    config = node_config(Fields("", {"ssds": ["/dev/disk/by-id/nvme-A_1", "/dev/loop7"],
                                     "data_dir": "/srv/sigma/"}, ""))
    assert config.ssds == ["/dev/disk/by-id/nvme-A_1", "/dev/loop7"]
    assert config.data_dir == "/srv/sigma"
    assert node_config(Fields("", {}, "")).ssds == []


@pytest.mark.parametrize(("ssds", "where", "text"), [
    (["/dev/sda"], "ssds[0]", "not a stable device path"),
    (["/dev/loop1", "/dev/disk/by-id/../../sda"], "ssds[1]", "not a stable device path"),
    (["/dev/loop1", "/dev/loop1"], "ssds[1]", "listed twice"),
    ("/dev/loop1", "ssds", "must be a list"),
    ([3], "ssds[0]", "not a stable device path"),
    (["/dev/disk/by-id/.."], "ssds[0]", "not a stable device path"),
    (["/dev/loop1\n"], "ssds[0]", "not a stable device path"),
])
def test_bad_node_ssds(ssds, where, text):
    err = node_error(ssds=ssds)
    assert err.field == where and text in err.message


@pytest.mark.parametrize("data_dir", ["/", "relative", 3])
def test_bad_data_dir(data_dir):
    assert node_error(data_dir=data_dir).field == "data_dir"


def test_overlay_netfilter_is_a_flag():
    assert node_config(Fields("", {"overlay_netfilter": True}, "")).overlay_netfilter
    err = node_error(overlay_netfilter="yes")
    assert err.field == "overlay_netfilter" and "must be true or false" in err.message


def test_unknown_node_key_rejected():
    err = node_error(engin="tcp://h:1")
    assert err.field == "engin"
    assert "unknown field" in err.message


# --- files -------------------------------------------------------------------------------------


def test_load_master_from_file(tmp_path: Path):
    path = tmp_path / "master.yaml"
    path.write_text(f"token: {TOKEN}\nlisten: 0.0.0.0:7475\netcd:\n  prefix: /lab/v1\n")
    cfg = load_master(path)
    assert cfg.token == TOKEN
    assert cfg.listen == "0.0.0.0:7475"
    assert cfg.etcd.prefix == "/lab/v1"


def test_load_node_from_file(tmp_path: Path):
    path = tmp_path / "node.yaml"
    path.write_text("name: n1\nreserved: {cpu: 1, memory: 2Gi}\nlabels: {zone: a}\n")
    cfg = load_node(str(path))
    assert cfg.name == "n1"
    assert cfg.reserved == Resources(1000, 2 * 2**30)
    assert cfg.labels == {"zone": "a"}


def test_empty_node_file_gives_defaults(tmp_path: Path):
    path = tmp_path / "node.yaml"
    path.write_text("")
    assert load_node(path).engine == DEFAULT_ENGINE


def test_empty_master_file_needs_a_token(tmp_path: Path):
    path = tmp_path / "master.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(SpecError) as info:
        load_master(path)
    assert info.value.field == "token"


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(SpecError) as info:
        load_master(tmp_path / "absent.yaml")
    assert "cannot read config" in info.value.message
    assert "absent.yaml" in info.value.message


def test_invalid_yaml_config(tmp_path: Path):
    path = tmp_path / "master.yaml"
    path.write_text("token: [unclosed\n")
    with pytest.raises(SpecError) as info:
        load_master(path)
    assert "is not valid YAML" in info.value.message


def test_config_must_be_a_mapping(tmp_path: Path):
    path = tmp_path / "node.yaml"
    path.write_text("- name: n1\n")
    with pytest.raises(SpecError) as info:
        load_node(path)
    assert "must be a mapping, got a list" in info.value.message


def test_audit_log_and_per_token_caps():
    cfg = master(token=TOKEN, audit_log="/var/log/sigma/audit.jsonl",
                 max_requests_per_token=5, max_streams_per_token=2)
    assert (cfg.audit_log, cfg.max_requests_per_token, cfg.max_streams_per_token) == (
        "/var/log/sigma/audit.jsonl", 5, 2)
    assert master_error(token=TOKEN, audit_log="audit.jsonl").field == "audit_log"
    assert master_error(token=TOKEN, max_streams_per_token=0).field == "max_streams_per_token"
    assert master_error(token=TOKEN, max_requests_per_token=True).field == \
        "max_requests_per_token"


def test_exec_idle_timeout():
    assert master(token=TOKEN).exec_idle_timeout == 900
    assert master(token=TOKEN, exec_idle_timeout=60).exec_idle_timeout == 60
    assert master_error(token=TOKEN, exec_idle_timeout=0.5).field == "exec_idle_timeout"
# --- hostile values (issue 16) -------------------------------------------------------------


@pytest.mark.parametrize("ratio", [float("inf"), float("nan"), float("-inf"), 0.5, 101, "2"])
def test_overcommit_must_be_a_finite_ratio_from_1(ratio):
    for key in ("cpu", "memory"):
        err = node_error(overcommit={key: ratio})
        assert err.field == f"overcommit.{key}"
        assert "at least 1 and at most 100" in err.message


def test_overcommit_inf_from_yaml_is_refused(tmp_path: Path):
    path = tmp_path / "node.yaml"
    path.write_text("overcommit: {cpu: .inf}\n")
    with pytest.raises(SpecError) as info:
        load_node(path)
    assert info.value.field == "overcommit.cpu"
    path.write_text("overcommit: {memory: .nan}\n")
    with pytest.raises(SpecError) as info:
        load_node(path)
    assert info.value.field == "overcommit.memory"


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 10**6])
def test_other_numbers_must_be_finite_and_bounded(value):
    assert node_error(heartbeat_ttl=value).field == "heartbeat_ttl"
    assert master_error(token=TOKEN, reconcile_interval=value).field == "reconcile_interval"


@pytest.mark.parametrize("name", ["h1\n", "a/b", "../x", "-h1", "h 1", "h" * 254])
def test_node_names_become_keys_so_they_are_matched_whole(name):
    assert node_error(name=name).field == "name"


def test_node_names_like_hosts_are_fine():
    for name in ("h1", "lab-h1", "host.example.com", "hollow_00001", "H" * 253):
        assert node_config(Fields("", {"name": name}, "")).name == name


@pytest.mark.parametrize("address", ["10.0.0", "host", 7, "10.0.0.1\n"])
def test_node_address_must_be_ipv4(address):
    assert node_error(address=address).field == "address"


def test_master_id_is_matched_whole():
    assert master_error(token=TOKEN, id="m1\n").field == "id"
