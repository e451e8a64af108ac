"""node.daemon.config: defaults, one error per bad key (naming it and where it came from),
environment overrides, unknown names, path resolution, and render/load round trips."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import node.daemon.config
from crypto.sealing import SealPolicy
from node.cluster.antientropy import AntiEntropyConfig
from node.cluster.handoff_plan import HandoffConfig
from node.daemon.config import (
    OTHER_ENV_VARS,
    SCHEMA,
    BackupConfig,
    ClusterConfig,
    DiscoveryConfig,
    ElectionConfig,
    HostPort,
    ListenConfig,
    NodeConfig,
    RolesConfig,
    TlsConfig,
    env_var,
    load_node_config,
    render_node_config,
)
from storage.cache import CacheConfig
from storage.datadir import ConfigError, KeysConfig, StorageConfig
from storage.index import IndexConfig

# Raw TOML literals per table: the smallest valid file.
MINIMAL: dict[str, dict[str, str]] = {
    "node": {"name": '"n1"'},
    "tls": {"ca": '"tls/ca.crt"', "cert": '"tls/n1.crt"', "key": '"tls/n1.key"'},
}


def toml_text(overrides: dict[str, dict[str, str]] | None = None, without: str = "") -> str:
    """MINIMAL, less the table ``without``, with ``overrides`` merged in (raw TOML values)."""
    tables = {name: dict(keys) for name, keys in MINIMAL.items() if name != without}
    for name, keys in (overrides or {}).items():
        tables.setdefault(name, {}).update(keys)
    return "".join(
        f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        for name, keys in tables.items()
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, toml_text()), env={})
    tls = tmp_path / "tls"
    assert cfg == NodeConfig(
        name="n1",
        data_dir=tmp_path,
        tls=TlsConfig(tls / "ca.crt", tls / "n1.crt", tls / "n1.key", tls / "ca.crl"),
        rpc=ListenConfig("127.0.0.1", 7000),
        http=ListenConfig("127.0.0.1", 7080),
        discovery=DiscoveryConfig("127.0.0.1", 7001, seeds=()),
        cluster=ClusterConfig(n=3, w=2, r=2, vnodes=64, request_timeout_s=2.0),
        roles=RolesConfig(served=None),
        storage=StorageConfig(),
        keys=KeysConfig(max_key_age_days=90),
        election=ElectionConfig(heartbeat_ms=150, election_timeout_ms=(300, 600)),
        backup=BackupConfig(schedule=None),
    )
    assert cfg.tls.files().ca_cert == tls / "ca.crt"


def test_small_cluster_defaults_w_and_r_to_n(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, toml_text({"cluster": {"n": "1"}})), env={})
    assert (cfg.cluster.n, cfg.cluster.w, cfg.cluster.r) == (1, 1, 1)


# (table, key, raw TOML value) -> the error names "table.key"
BAD_FILE_VALUES = [
    ("node", "name", '"bad name!"'),
    ("node", "name", '""'),
    ("node", "name", "5"),
    ("node", "data_dir", "5"),
    ("node", "data_dir", '""'),
    ("rpc", "host", '""'),
    ("rpc", "host", '"a b"'),
    ("rpc", "port", "70000"),
    ("rpc", "port", "-1"),
    ("rpc", "port", '"7000"'),
    ("rpc", "port", "true"),
    ("rpc", "port", "1.5"),
    ("http", "port", "7000"),  # the same TCP port as rpc
    ("discovery", "port", "65536"),
    ("discovery", "seeds", '"127.0.0.1:7001"'),
    ("discovery", "seeds", '["nohost"]'),
    ("discovery", "seeds", '["127.0.0.1:0"]'),
    ("discovery", "seeds", '["::1:7001"]'),
    ("discovery", "seeds", "[1]"),
    ("tls", "ca", "5"),
    ("tls", "crl", '""'),
    ("cluster", "n", "0"),
    ("cluster", "w", "4"),
    ("cluster", "r", "0"),
    ("cluster", "vnodes", "0"),
    ("cluster", "request_timeout_s", "0"),
    ("cluster", "request_timeout_s", '"2"'),
    ("cluster", "request_timeout_s", "inf"),
    ("roles", "served", '"admin"'),
    ("roles", "served", '["bad role"]'),
    ("roles", "served", '["admin", "admin"]'),
    ("storage", "index_backend", '"lucene"'),
    ("storage", "index_backend", "{ a = 1 }"),
    ("storage", "index_refresh_s", "0"),
    ("storage", "index_refresh_s", "nan"),
    ("storage", "cache_max_bytes", "-1"),
    ("storage", "cache_ttl_s", '"x"'),
    ("keys", "max_key_age_days", "-1"),
    ("keys", "max_key_age_days", "1.5"),
    ("keys", "data_key_max_records", "0"),
    ("keys", "data_key_max_records", "16777217"),
    ("keys", "data_key_max_records", "4096.0"),
    ("keys", "data_key_max_records", "true"),
    ("keys", "data_key_max_age_s", "0"),
    ("keys", "data_key_max_age_s", "-5"),
    ("keys", "data_key_max_age_s", "nan"),
    ("keys", "data_key_max_age_s", "inf"),
    ("keys", "data_key_max_age_s", '"1h"'),
    ("election", "heartbeat_ms", "0"),
    ("election", "heartbeat_ms", "300"),  # not below the election timeout's MIN
    ("election", "election_timeout_ms", "[600, 300]"),
    ("election", "election_timeout_ms", "[300]"),
    ("election", "election_timeout_ms", '"300,600"'),
    ("election", "election_timeout_ms", "[100, 200]"),  # MIN not above the heartbeat
    ("backup", "schedule", "5"),
    ("backup", "keep", "0"),
    ("backup", "incremental", "-1"),
    ("backup", "dir", '""'),
    ("antientropy", "enabled", '"yes"'),
    ("antientropy", "interval_s", "0"),
    ("antientropy", "interval_s", "true"),
    ("antientropy", "bytes_per_s", "10"),
    ("antientropy", "max_repairs_per_exchange", "0"),
    ("handoff", "enabled", '"yes"'),
    ("handoff", "sloppy_quorum", "1"),
    ("handoff", "max_bytes", "1024"),
    ("handoff", "interval_s", "0"),
    ("handoff", "interval_s", "true"),
]


@pytest.mark.parametrize(("table", "key", "raw"), BAD_FILE_VALUES)
def test_bad_file_value_names_its_key_and_the_file(
    tmp_path: Path, table: str, key: str, raw: str
) -> None:
    path = write(tmp_path, toml_text({table: {key: raw}}))
    with pytest.raises(ConfigError) as info:
        load_node_config(path, env={})
    assert info.value.field == f"{table}.{key}"
    assert f"{table}.{key}" in info.value.message
    assert f"in {path}" in info.value.message


BAD_ENV_VALUES = [
    ("SLURP_NODE_NAME", "", "node.name"),
    ("SLURP_NODE_DATA_DIR", "", "node.data_dir"),
    ("SLURP_RPC_PORT", "abc", "rpc.port"),
    ("SLURP_HTTP_PORT", "7000", "http.port"),
    ("SLURP_DISCOVERY_SEEDS", "a:b", "discovery.seeds"),
    ("SLURP_TLS_CA", "", "tls.ca"),
    ("SLURP_CLUSTER_W", "9", "cluster.w"),
    ("SLURP_CLUSTER_REQUEST_TIMEOUT_S", "soon", "cluster.request_timeout_s"),
    ("SLURP_ROLES_SERVED", "admin,no way", "roles.served"),
    ("SLURP_STORAGE_INDEX_BACKEND", "lucene", "storage.index_backend"),
    ("SLURP_STORAGE_CACHE_TTL_S", "nan", "storage.cache_ttl_s"),
    ("SLURP_STORAGE_CACHE_MAX_BYTES", "1.5", "storage.cache_max_bytes"),
    ("SLURP_KEYS_MAX_KEY_AGE_DAYS", "-3", "keys.max_key_age_days"),
    ("SLURP_KEYS_DATA_KEY_MAX_RECORDS", "many", "keys.data_key_max_records"),
    ("SLURP_KEYS_DATA_KEY_MAX_RECORDS", "0", "keys.data_key_max_records"),
    ("SLURP_KEYS_DATA_KEY_MAX_AGE_S", "-1", "keys.data_key_max_age_s"),
    ("SLURP_ELECTION_ELECTION_TIMEOUT_MS", "600,300", "election.election_timeout_ms"),
    ("SLURP_ELECTION_ELECTION_TIMEOUT_MS", "x", "election.election_timeout_ms"),
    ("SLURP_ELECTION_HEARTBEAT_MS", "1000", "election.heartbeat_ms"),
    ("SLURP_ANTIENTROPY_ENABLED", "maybe", "antientropy.enabled"),
    ("SLURP_ANTIENTROPY_INTERVAL_S", "-1", "antientropy.interval_s"),
    ("SLURP_HANDOFF_ENABLED", "maybe", "handoff.enabled"),
    ("SLURP_HANDOFF_MAX_BYTES", "lots", "handoff.max_bytes"),
    ("SLURP_HANDOFF_INTERVAL_S", "-1", "handoff.interval_s"),
]


def test_keys_table_sets_the_data_key_policy_from_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, toml_text({"keys": {"data_key_max_records": "100"}}))
    cfg = load_node_config(path, env={})
    assert cfg.keys == KeysConfig(max_key_age_days=90, data_key_max_records=100)
    assert cfg.keys.seal_policy() == SealPolicy(max_records=100, max_age_s=3600.0)
    env = {"SLURP_KEYS_DATA_KEY_MAX_AGE_S": "90", "SLURP_KEYS_DATA_KEY_MAX_RECORDS": "5"}
    cfg = load_node_config(path, env=env)
    assert cfg.keys.seal_policy() == SealPolicy(max_records=5, max_age_s=90.0)
    defaults = load_node_config(write(tmp_path, toml_text()), env={}).keys
    assert defaults.seal_policy() == SealPolicy()  # 4,096 records, 1 h


def test_handoff_table_from_file_and_environment(tmp_path: Path) -> None:
    path = write(tmp_path, toml_text({"handoff": {"sloppy_quorum": "true", "max_bytes": "65536"}}))
    cfg = load_node_config(path, env={})
    assert cfg.handoff == HandoffConfig(enabled=True, sloppy_quorum=True, max_bytes=65536)
    env = {"SLURP_HANDOFF_ENABLED": "false", "SLURP_HANDOFF_INTERVAL_S": "0.5"}
    cfg = load_node_config(path, env=env)
    assert cfg.handoff == HandoffConfig(False, True, 65536, 0.5)
    assert load_node_config(write(tmp_path, toml_text()), env={}).handoff == HandoffConfig()


@pytest.mark.parametrize(("var", "text", "name"), BAD_ENV_VALUES)
def test_bad_env_value_names_its_key_and_the_variable(
    tmp_path: Path, var: str, text: str, name: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(write(tmp_path, toml_text()), env={var: text})
    assert info.value.field == name
    assert name in info.value.message
    assert f"set by {var}" in info.value.message


@pytest.mark.parametrize(("missing", "name"), [("node", "node.name"), ("tls", "tls.ca")])
def test_missing_required_key_says_how_to_set_it(tmp_path: Path, missing: str, name: str) -> None:
    text = toml_text(without=missing)
    with pytest.raises(ConfigError) as info:
        load_node_config(write(tmp_path, text), env={})
    assert info.value.field == name
    table, key = name.split(".")
    assert env_var(table, key) in info.value.message


@pytest.mark.parametrize(
    ("text", "env", "name"),
    [
        ("[rpcc]\nport = 1\n", {}, "rpcc"),
        ("[rpc]\nprot = 1\n", {}, "rpc.prot"),
        ('name = "n1"\n', {}, "name"),
        ("rpc = 5\n", {}, "rpc"),
        ("", {"SLURP_RPC_PROT": "1"}, "SLURP_RPC_PROT"),
        ("", {"SLURP_SEEDS": "127.0.0.1:7001"}, "SLURP_SEEDS"),
        ("", {"SLURP_RPC_port": "1"}, "SLURP_RPC_port"),
    ],
)
def test_unknown_names_are_errors(
    tmp_path: Path, text: str, env: dict[str, str], name: str
) -> None:
    path = write(tmp_path, text + toml_text())
    with pytest.raises(ConfigError) as info:
        load_node_config(path, env=env)
    assert info.value.field == name
    assert name.split(".")[-1] in info.value.message


def test_unknown_variable_suggests_the_real_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean SLURP_DISCOVERY_SEEDS"):
        load_node_config(write(tmp_path, toml_text()), env={"SLURP_SEEDS": "h:1"})


def test_other_slurp_variables_are_left_alone(tmp_path: Path) -> None:
    env = dict.fromkeys(OTHER_ENV_VARS, "x") | {"PATH": "/bin", "SLURPY": "1"}
    assert load_node_config(write(tmp_path, toml_text()), env=env).name == "n1"


@pytest.mark.parametrize("text", ["[node\n", "\xff\xfe not utf-8"])
def test_unreadable_file_names_the_config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_node_config(path, env={})
    assert info.value.field == "config"


def test_missing_file_names_the_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_node_config(tmp_path / "nope.toml", env={})
    assert info.value.field == "config"


def test_env_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        toml_text(
            {
                "rpc": {"port": "7100"},
                "cluster": {"n": "5", "w": "3"},
                "discovery": {"seeds": '["10.0.0.1:7001"]'},
                "storage": {"index_backend": '"tantivy"', "cache_ttl_s": "10"},
                "backup": {"schedule": '"daily"'},
            }
        ),
    )
    env = {
        "SLURP_NODE_NAME": "n9",
        "SLURP_RPC_PORT": "7200",
        "SLURP_CLUSTER_N": "3",
        "SLURP_DISCOVERY_SEEDS": "127.0.0.1:7001, [::1]:7002",
        "SLURP_STORAGE_INDEX_BACKEND": "whoosh",
        "SLURP_ELECTION_ELECTION_TIMEOUT_MS": "400,800",
        "SLURP_ROLES_SERVED": "admin,observer",
        "SLURP_BACKUP_SCHEDULE": "",
    }
    cfg = load_node_config(path, env=env)
    assert cfg.name == "n9"
    assert cfg.rpc.port == 7200
    assert (cfg.cluster.n, cfg.cluster.w) == (3, 3)  # w from the file, n from the env
    assert cfg.discovery.seeds == (HostPort("127.0.0.1", 7001), HostPort("::1", 7002))
    assert cfg.storage.index.backend == "whoosh"
    assert cfg.storage.cache.ttl_s == 10.0  # the file's, kept beside the override
    assert cfg.election.election_timeout_ms == (400, 800)
    assert cfg.roles.served == ("admin", "observer")
    assert cfg.backup.schedule is None


def test_empty_list_variables_mean_empty_lists(tmp_path: Path) -> None:
    path = write(tmp_path, toml_text({"discovery": {"seeds": '["10.0.0.1:7001"]'}}))
    env = {"SLURP_DISCOVERY_SEEDS": "", "SLURP_ROLES_SERVED": ""}
    cfg = load_node_config(path, env=env)
    assert cfg.discovery.seeds == ()
    assert cfg.roles.served == ()


def test_an_override_can_break_a_file_value_it_meets(tmp_path: Path) -> None:
    """Cross-key checks see the merged values: the file's w against the env's n."""
    path = write(tmp_path, toml_text({"cluster": {"w": "3"}}))
    with pytest.raises(ConfigError) as info:
        load_node_config(path, env={"SLURP_CLUSTER_N": "2"})
    assert info.value.field == "cluster.w"
    assert f"in {path}" in info.value.message


def test_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File paths are relative to the file's directory, env paths to the working directory."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, toml_text({"node": {"data_dir": '"../data"'}}))
    cfg = load_node_config(path, env={})
    assert cfg.data_dir == conf_dir / ".." / "data"
    assert cfg.tls.ca == conf_dir / "tls" / "ca.crt"
    assert cfg.tls.crl == conf_dir / "tls" / "ca.crl"

    monkeypatch.chdir(tmp_path)
    env = {"SLURP_NODE_DATA_DIR": "here", "SLURP_TLS_CA": "pki/ca.crt"}
    cfg = load_node_config(Path("etc/config.toml"), env=env)
    assert cfg.data_dir == tmp_path / "here"
    assert cfg.tls.ca == tmp_path / "pki" / "ca.crt"
    assert cfg.tls.crl == tmp_path / "pki" / "ca.crl"  # follows the CA
    assert cfg.tls.cert == tmp_path / "etc" / "tls" / "n1.crt"
    assert cfg.tls.ca.is_absolute()


def test_render_load_round_trip_of_a_full_config(tmp_path: Path) -> None:
    cfg = NodeConfig(
        name="node-7",
        data_dir=tmp_path / "data dir",
        tls=TlsConfig(
            ca=tmp_path / "ca.crt",
            cert=tmp_path / "n.crt",
            key=tmp_path / "n.key",
            crl=tmp_path / "elsewhere" / "ca.crl",
        ),
        rpc=ListenConfig("0.0.0.0", 0),
        http=ListenConfig("::1", 0),
        discovery=DiscoveryConfig("localhost", 7301, (HostPort("h1", 1), HostPort("::1", 2))),
        cluster=ClusterConfig(n=5, w=3, r=1, vnodes=128, request_timeout_s=0.25),
        roles=RolesConfig(served=("admin", "observer")),
        storage=StorageConfig(
            index=IndexConfig(backend="whoosh", refresh_interval_s=0.5),
            cache=CacheConfig(max_bytes=1024, ttl_s=1.5),
        ),
        keys=KeysConfig(max_key_age_days=0, data_key_max_records=7, data_key_max_age_s=0.25),
        election=ElectionConfig(heartbeat_ms=50, election_timeout_ms=(150, 151)),
        backup=BackupConfig(schedule='0 3 * * * "nightly"\t\\'),
    )
    assert load_node_config(write(tmp_path, render_node_config(cfg)), env={}) == cfg


def test_rendered_defaults_read_back_equal(tmp_path: Path) -> None:
    cfg = load_node_config(write(tmp_path, toml_text()), env={})
    text = render_node_config(cfg)
    assert "# served: unset" in text
    assert load_node_config(write(tmp_path, text), env={}) == cfg


path_parts = st.text(st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1).filter(
    lambda part: part not in (".", "..")
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    schedule=st.none() | st.text(st.characters(codec="utf-8")),
    part=path_parts,
    served=st.none() | st.lists(st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True), unique=True),
    n=st.integers(1, 64),
    data=st.data(),
)
def test_render_load_round_trip(
    schedule: str | None, part: str, served: list[str] | None, n: int, data: st.DataObject
) -> None:
    """load(render(cfg)) == cfg for any schedule text, path, role list and valid n/w/r."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        cfg = NodeConfig(
            name="n",
            data_dir=base / part,
            tls=TlsConfig(base / part / "ca.crt", base / "c", base / "k", base / "ca.crl"),
            cluster=ClusterConfig(
                n=n, w=data.draw(st.integers(1, n)), r=data.draw(st.integers(1, n))
            ),
            roles=RolesConfig(served=None if served is None else tuple(served)),
            backup=BackupConfig(schedule=schedule),
            handoff=HandoffConfig(
                enabled=data.draw(st.booleans()),
                sloppy_quorum=data.draw(st.booleans()),
                max_bytes=data.draw(st.integers(65536, 1 << 40)),
                interval_s=data.draw(st.floats(0.05, 3600)),
            ),
        )
        path = base / "config.toml"
        path.write_text(render_node_config(cfg), encoding="utf-8")
        assert load_node_config(path, env={}) == cfg


def test_docstring_lists_every_key_and_variable() -> None:
    doc = node.daemon.config.__doc__ or ""
    for table, keys in SCHEMA.items():
        for key in keys:
            assert f"[{table}] {key} " in doc
            assert env_var(table, key) in doc


def test_antientropy_table_from_file_and_environment(tmp_path: Path) -> None:
    assert load_node_config(write(tmp_path, toml_text()), env={}).antientropy == (
        AntiEntropyConfig()
    )
    path = write(tmp_path, toml_text({"antientropy": {"enabled": "false", "interval_s": "5"}}))
    env = {"SLURP_ANTIENTROPY_INTERVAL_S": "0.5", "SLURP_ANTIENTROPY_BYTES_PER_S": "4096"}
    cfg = load_node_config(path, env=env).antientropy
    assert (cfg.enabled, cfg.interval_s, cfg.bytes_per_s) == (False, 0.5, 4096)
    assert load_node_config(path, env={"SLURP_ANTIENTROPY_ENABLED": "TRUE"}).antientropy.enabled
