"""One node's configuration (ARCHITECTURE.md §8): a TOML file, overridden by ``SLURP_*``.

Owns: ``NodeConfig`` and its tables, ``load_node_config`` (read, merge the environment,
validate) and ``render_node_config`` (the TOML that ``load_node_config`` reads back).
The ``[storage]`` and ``[keys]`` tables are validated by ``storage.datadir``'s loaders and
errors are its ``ConfigError``, whose ``field`` names the key as ``"table.key"``.
Must not know: sockets, trio, what the values are used for.

Environment: ``SLURP_<TABLE>_<KEY>``, table and key upper-cased, overrides ``table.key``
of the file. Integers and numbers are written as in TOML; lists as comma-separated items
(an empty value: an empty list); booleans as ``true``/``false``; ``election_timeout_ms``
as ``MIN,MAX``; an empty ``SLURP_BACKUP_SCHEDULE`` means none. Any other ``SLURP_*``
variable is an error (a typo must not be ignored), except those of ``OTHER_ENV_VARS``
(``SLURP_HOME``, ``SLURP_PASSPHRASE``), which are not configuration: add new ones there.

Relative paths in the file are resolved against the file's directory, relative paths
from the environment against the current directory; ``~`` is expanded in both.

    key                            environment variable                default
    [node] name                    SLURP_NODE_NAME                     required: A-Z a-z 0-9 _ -
    [node] data_dir                SLURP_NODE_DATA_DIR                 the file's directory
    [rpc] host                     SLURP_RPC_HOST                      "127.0.0.1"
    [rpc] port                     SLURP_RPC_PORT                      7000 (TCP; 0: any)
    [http] host                    SLURP_HTTP_HOST                     "127.0.0.1"
    [http] port                    SLURP_HTTP_PORT                     7080 (TCP; 0: any)
    [discovery] host               SLURP_DISCOVERY_HOST                "127.0.0.1"
    [discovery] port               SLURP_DISCOVERY_PORT                7001 (UDP; 0: any)
    [discovery] seeds              SLURP_DISCOVERY_SEEDS               [] ("host:port" items)
    [tls] ca                       SLURP_TLS_CA                        required (ca.crt)
    [tls] cert                     SLURP_TLS_CERT                      required
    [tls] key                      SLURP_TLS_KEY                       required
    [tls] crl                      SLURP_TLS_CRL                       ca.crl next to ca
    [cluster] n                    SLURP_CLUSTER_N                     3 (1..64)
    [cluster] w                    SLURP_CLUSTER_W                     2 (1..n)
    [cluster] r                    SLURP_CLUSTER_R                     2 (1..n)
    [cluster] vnodes               SLURP_CLUSTER_VNODES                64 (1..4096)
    [cluster] request_timeout_s    SLURP_CLUSTER_REQUEST_TIMEOUT_S     2.0
    [cluster] max_inflight_requests  SLURP_CLUSTER_MAX_INFLIGHT_REQUESTS  256 (1..100000; per kind)
    [cluster] max_repair_sends     SLURP_CLUSTER_MAX_REPAIR_SENDS      64 (0..100000)
    [roles] served                 SLURP_ROLES_SERVED                  every role in the keyring
    [storage] index_backend        SLURP_STORAGE_INDEX_BACKEND         "tantivy" or "whoosh"
    [storage] index_refresh_s      SLURP_STORAGE_INDEX_REFRESH_S       1.0
    [storage] cache_max_bytes      SLURP_STORAGE_CACHE_MAX_BYTES       67108864
    [storage] cache_ttl_s          SLURP_STORAGE_CACHE_TTL_S           300.0
    [keys] max_key_age_days        SLURP_KEYS_MAX_KEY_AGE_DAYS         90 (0: never warn)
    [keys] data_key_max_records    SLURP_KEYS_DATA_KEY_MAX_RECORDS     4096 (1..16777216 records
                                                                       sealed per data key)
    [keys] data_key_max_age_s      SLURP_KEYS_DATA_KEY_MAX_AGE_S       3600.0 (> 0, <= a year)
    [election] heartbeat_ms        SLURP_ELECTION_HEARTBEAT_MS         150 (< MIN below)
    [election] election_timeout_ms SLURP_ELECTION_ELECTION_TIMEOUT_MS  [300, 600] (MIN < MAX)
    [backup] schedule              SLURP_BACKUP_SCHEDULE               none (kept as written; the
                                                                       backup service parses it)
    [backup] dir                   SLURP_BACKUP_DIR                    DATA_DIR/backups
    [backup] keep                  SLURP_BACKUP_KEEP                   7 full backups (1..10000)
    [backup] incremental           SLURP_BACKUP_INCREMENTAL            6 between fulls (0..10000)
    [backup] restore_max_bytes     SLURP_BACKUP_RESTORE_MAX_BYTES      8 GiB of backup files sent
                                                                       to a leader for a cluster
                                                                       restore (1 MiB..16 TiB)
    [antientropy] enabled          SLURP_ANTIENTROPY_ENABLED           true
    [antientropy] interval_s       SLURP_ANTIENTROPY_INTERVAL_S        60.0 (> 0)
    [antientropy] bytes_per_s      SLURP_ANTIENTROPY_BYTES_PER_S       8388608 (>= 1024)
    [antientropy] max_repairs_per_exchange  SLURP_ANTIENTROPY_MAX_REPAIRS_PER_EXCHANGE  1000
    [handoff] enabled              SLURP_HANDOFF_ENABLED               true (true/false, 1/0)
    [handoff] sloppy_quorum        SLURP_HANDOFF_SLOPPY_QUORUM         false (hints count toward W)
    [handoff] max_bytes            SLURP_HANDOFF_MAX_BYTES             268435456 (>= 65536)
    [handoff] interval_s           SLURP_HANDOFF_INTERVAL_S            2.0 (0.05..3600)

Invariants: a loaded ``NodeConfig`` holds absolute paths and passed every check;
``load_node_config(render_node_config(cfg))`` equals ``cfg`` when ``cfg`` was loaded.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

from crypto.tls import TlsFiles
from node.cluster.antientropy import AntiEntropyConfig
from node.cluster.handoff_plan import (
    DEFAULT_HANDOFF_INTERVAL_S,
    DEFAULT_HINT_MAX_BYTES,
    HandoffConfig,
)
from storage.datadir import (
    ConfigError,
    KeysConfig,
    StorageConfig,
    load_keys_config,
    load_storage_config,
)

ENV_PREFIX = "SLURP_"
OTHER_ENV_VARS = frozenset({"SLURP_HOME", "SLURP_PASSPHRASE"})  # read elsewhere, not config
DEFAULT_RPC_PORT = 7000
DEFAULT_DISCOVERY_PORT = 7001
DEFAULT_HTTP_PORT = 7080
DEFAULT_HOST = "127.0.0.1"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HOST = re.compile(r"^[A-Za-z0-9._:%-]{1,253}$")
_SHOWN_CHARS = 80
_UNSET = object()
T = TypeVar("T")

# table -> key -> how an environment value is read ("int", "float", "str", "path",
# "list", "int_pair", "optional_str", "bool"); also the set of known tables and keys.
SCHEMA: dict[str, dict[str, str]] = {
    "node": {"name": "str", "data_dir": "path"},
    "rpc": {"host": "str", "port": "int"},
    "http": {"host": "str", "port": "int"},
    "discovery": {"host": "str", "port": "int", "seeds": "list"},
    "tls": {"ca": "path", "cert": "path", "key": "path", "crl": "path"},
    "cluster": {
        "n": "int",
        "w": "int",
        "r": "int",
        "vnodes": "int",
        "request_timeout_s": "float",
        "max_inflight_requests": "int",
        "max_repair_sends": "int",
    },
    "roles": {"served": "list"},
    "storage": {
        "index_backend": "str",
        "index_refresh_s": "float",
        "cache_max_bytes": "int",
        "cache_ttl_s": "float",
    },
    "keys": {
        "max_key_age_days": "int",
        "data_key_max_records": "int",
        "data_key_max_age_s": "float",
    },
    "election": {"heartbeat_ms": "int", "election_timeout_ms": "int_pair"},
    "backup": {
        "schedule": "optional_str",
        "dir": "path",
        "keep": "int",
        "incremental": "int",
        "restore_max_bytes": "int",
    },
    "antientropy": {
        "enabled": "bool",
        "interval_s": "float",
        "bytes_per_s": "int",
        "max_repairs_per_exchange": "int",
    },
    "handoff": {
        "enabled": "bool",
        "sloppy_quorum": "bool",
        "max_bytes": "int",
        "interval_s": "float",
    },
}


def env_var(table: str, key: str) -> str:
    """The environment variable that overrides ``table.key`` (``SLURP_RPC_PORT``)."""
    return f"{ENV_PREFIX}{table.upper()}_{key.upper()}"


class HostPort(NamedTuple):
    """A ``host:port`` address (``[v6]:port`` for IPv6); a plain tuple for socket APIs."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Parse ``host:port`` or ``[v6]:port``; the port must be 1..65535.

        Raises:
            ValueError: anything else.
        """
        host, _, port = text.strip().rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError("an IPv6 host needs brackets")
        if not (_HOST.match(host) and port.isascii() and port.isdigit()):
            raise ValueError("not host:port")
        if not 1 <= int(port) <= 65535:
            raise ValueError("port out of range")
        return cls(host, int(port))


@dataclass(frozen=True)
class ListenConfig:
    """Where a service listens; port 0 asks the OS for a free one."""

    host: str = DEFAULT_HOST
    port: int = 0


@dataclass(frozen=True)
class DiscoveryConfig:
    """The ``[discovery]`` table: the Kademlia UDP endpoint and the members to join by."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_DISCOVERY_PORT
    seeds: tuple[HostPort, ...] = ()


@dataclass(frozen=True)
class TlsConfig:
    """The ``[tls]`` table: the cluster CA certificate, this node's certificate and key, CRL."""

    ca: Path
    cert: Path
    key: Path
    crl: Path

    def files(self) -> TlsFiles:
        """The same paths as ``crypto.tls`` takes them."""
        return TlsFiles(ca_cert=self.ca, cert=self.cert, key=self.key, crl=self.crl)


@dataclass(frozen=True)
class ClusterConfig:
    """The ``[cluster]`` table: replication factors, ring resolution, request deadline."""

    n: int = 3
    w: int = 2
    r: int = 2
    vnodes: int = 64
    request_timeout_s: float = 2.0
    max_inflight_requests: int = 256  # client requests (and, apart, replica requests) at once
    max_repair_sends: int = 64  # concurrent background read-repair sends


@dataclass(frozen=True)
class RolesConfig:
    """The ``[roles]`` table; ``served`` None means every role in the keyring."""

    served: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ElectionConfig:
    """The ``[election]`` table (Raft §5.2): heartbeat period, randomized timeout range."""

    heartbeat_ms: int = 150
    election_timeout_ms: tuple[int, int] = (300, 600)


DEFAULT_RESTORE_MAX_BYTES = 8 << 30


@dataclass(frozen=True)
class BackupConfig:
    """The ``[backup]`` table; ``schedule`` is kept as written (``storage.backup_plan``
    parses it when the backup service starts: a bad one is reported, never fatal)."""

    schedule: str | None = None
    dir: Path | None = None  # None: DATA_DIR/backups
    keep: int = 7
    incremental: int = 6
    # the most bytes of backup files a leader keeps uploaded for ``slurp --profile P restore``
    restore_max_bytes: int = DEFAULT_RESTORE_MAX_BYTES


@dataclass(frozen=True)
class NodeConfig:
    """A validated node configuration (see the module docstring for every key)."""

    name: str
    data_dir: Path
    tls: TlsConfig
    rpc: ListenConfig = field(default_factory=lambda: ListenConfig(port=DEFAULT_RPC_PORT))
    http: ListenConfig = field(default_factory=lambda: ListenConfig(port=DEFAULT_HTTP_PORT))
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    keys: KeysConfig = field(default_factory=KeysConfig)
    election: ElectionConfig = field(default_factory=ElectionConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    antientropy: AntiEntropyConfig = field(default_factory=AntiEntropyConfig)
    handoff: HandoffConfig = field(default_factory=HandoffConfig)


def load_node_config(path: Path, env: Mapping[str, str] = os.environ) -> NodeConfig:
    """Read ``path``, apply ``SLURP_*`` overrides from ``env``, and validate everything.

    Args:
        path: The node's TOML file (it must exist).
        env: The environment to take overrides from.

    Returns:
        The validated configuration, with absolute paths.

    Raises:
        ConfigError: unreadable TOML, an unknown table, key or ``SLURP_<TABLE>_*`` variable,
            a missing required key, or a bad value. ``field`` is ``"table.key"`` (``"config"``
            for the file itself) and the message says what was expected and where the bad
            value came from.
    """
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as TOML: {exc}", field="config") from None
    return _Reader(path, doc, env).node_config()


@dataclass(frozen=True)
class _Value:
    value: Any
    source: str  # "set in FILE" or "set by SLURP_X"
    from_env: bool


class _Reader:
    """Merges file and environment into ``table.key -> _Value``, then validates each key."""

    def __init__(self, path: Path, doc: dict[str, Any], env: Mapping[str, str]) -> None:
        self.path = path
        self.file_dir = path.absolute().parent
        self.values: dict[str, _Value] = {}
        tables = ", ".join(f"[{t}]" for t in SCHEMA)
        for table, content in doc.items():
            if table not in SCHEMA:
                what = f"table [{table}]" if isinstance(content, dict) else f"top-level key {table}"
                raise ConfigError(f"unknown {what} in {path} (tables: {tables})", field=table)
            if not isinstance(content, dict):
                raise ConfigError(f"[{table}] in {path} must be a table", field=table)
            for key, value in content.items():
                if key not in SCHEMA[table]:
                    known = ", ".join(SCHEMA[table])
                    raise ConfigError(
                        f"unknown key {table}.{key} in {path} ([{table}] has: {known})",
                        field=f"{table}.{key}",
                    )
                self.values[f"{table}.{key}"] = _Value(value, f"set in {path}", False)
        for var, text in env.items():
            if var.startswith(ENV_PREFIX) and var not in OTHER_ENV_VARS:
                table, key = _env_key(var)
                value = _from_env(SCHEMA[table][key], text)
                self.values[f"{table}.{key}"] = _Value(value, f"set by {var}", True)
        for name, item in self.values.items():
            if isinstance(item.value, float) and not math.isfinite(item.value):
                self._fail(name, "a finite number")

    def node_config(self) -> NodeConfig:
        cluster = self._cluster()
        rpc = self._listen("rpc", DEFAULT_RPC_PORT)
        http = self._listen("http", DEFAULT_HTTP_PORT)
        if http.port == rpc.port != 0:
            blamed = "http.port" if "http.port" in self.values else "rpc.port"
            self._fail(blamed, "a port other than the other TCP service's (rpc.port, http.port)")
        return NodeConfig(
            name=self._str("node.name", None, _NAME.match, "1-64 of A-Z a-z 0-9 _ -"),
            data_dir=self._path("node.data_dir") or self.file_dir,
            tls=self._tls(),
            rpc=rpc,
            http=http,
            discovery=DiscoveryConfig(
                host=self._host("discovery.host"),
                port=self._int("discovery.port", DEFAULT_DISCOVERY_PORT, 0, 65535),
                seeds=self._seeds(),
            ),
            cluster=cluster,
            roles=RolesConfig(served=self._served()),
            storage=self._delegated("storage", load_storage_config),
            keys=self._delegated("keys", load_keys_config),
            election=self._election(),
            backup=BackupConfig(
                schedule=self._optional_str("backup.schedule"),
                dir=self._path("backup.dir"),
                keep=self._int("backup.keep", 7, 1, 10_000),
                incremental=self._int("backup.incremental", 6, 0, 10_000),
                restore_max_bytes=self._int(
                    "backup.restore_max_bytes", DEFAULT_RESTORE_MAX_BYTES, 1 << 20, 1 << 44
                ),
            ),
            antientropy=self._antientropy(),
            handoff=self._handoff(),
        )

    def _fail(self, name: str, expected: str, value: object = _UNSET) -> NoReturn:
        item = self.values[name]
        shown = repr(item.value if value is _UNSET else value)
        if len(shown) > _SHOWN_CHARS:
            shown = shown[: _SHOWN_CHARS - 3] + "..."
        raise ConfigError(f"{name} must be {expected}, not {shown} ({item.source})", field=name)

    def _required(self, name: str) -> NoReturn:
        table, key = name.split(".")
        raise ConfigError(
            f"{name} is required: set it in [{table}] of {self.path} or by {env_var(table, key)}",
            field=name,
        )

    def _int(self, name: str, default: int, low: int, high: int) -> int:
        if name not in self.values:
            return default
        value = self.values[name].value
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self._fail(name, f"an integer in {low}..{high}")
        return value

    def _str(
        self, name: str, default: str | None, check: Callable[[str], object], expected: str
    ) -> str:
        if name not in self.values:
            if default is None:
                self._required(name)
            return default
        value = self.values[name].value
        if not isinstance(value, str) or not check(value):
            self._fail(name, expected)
        return value

    def _optional_str(self, name: str) -> str | None:
        item = self.values.get(name)
        if item is None or item.value is None:
            return None
        if not isinstance(item.value, str):
            self._fail(name, "a string")
        return item.value

    def _host(self, name: str) -> str:
        return self._str(name, DEFAULT_HOST, _HOST.match, "a host name or IP address")

    def _path(self, name: str) -> Path | None:
        item = self.values.get(name)
        if item is None:
            return None
        if not isinstance(item.value, str) or not item.value or "\x00" in item.value:
            self._fail(name, "a path (a non-empty string)")
        base = Path.cwd() if item.from_env else self.file_dir
        return base / Path(item.value).expanduser()

    def _strings(self, name: str, expected: str) -> list[str] | None:
        item = self.values.get(name)
        if item is None:
            return None
        value = item.value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self._fail(name, f"a list of {expected}")
        return value

    def _listen(self, table: str, default_port: int) -> ListenConfig:
        return ListenConfig(
            host=self._host(f"{table}.host"),
            port=self._int(f"{table}.port", default_port, 0, 65535),
        )

    def _seeds(self) -> tuple[HostPort, ...]:
        expected = "'host:port' strings (port 1..65535, IPv6 as [addr]:port)"
        seeds = []
        for text in self._strings("discovery.seeds", expected) or []:
            try:
                seeds.append(HostPort.parse(text))
            except ValueError:
                self._fail("discovery.seeds", f"a list of {expected}", text)
        return tuple(seeds)

    def _tls(self) -> TlsConfig:
        ca, cert, key = (self._required_path(f"tls.{name}") for name in ("ca", "cert", "key"))
        return TlsConfig(
            ca=ca, cert=cert, key=key, crl=self._path("tls.crl") or ca.parent / "ca.crl"
        )

    def _required_path(self, name: str) -> Path:
        path = self._path(name)
        if path is None:
            self._required(name)
        return path

    def _cluster(self) -> ClusterConfig:
        n = self._int("cluster.n", 3, 1, 64)
        return ClusterConfig(
            n=n,
            w=self._int("cluster.w", min(2, n), 1, n),
            r=self._int("cluster.r", min(2, n), 1, n),
            vnodes=self._int("cluster.vnodes", 64, 1, 4096),
            request_timeout_s=self._seconds("cluster.request_timeout_s", 2.0),
            max_inflight_requests=self._int("cluster.max_inflight_requests", 256, 1, 100_000),
            max_repair_sends=self._int("cluster.max_repair_sends", 64, 0, 100_000),
        )

    def _seconds(self, name: str, default: float) -> float:
        """A positive number of seconds (``default`` when unset)."""
        item = self.values.get(name)
        if item is None:
            return default
        if isinstance(item.value, bool) or not isinstance(item.value, int | float):
            self._fail(name, "a positive number of seconds")
        if item.value <= 0:
            self._fail(name, "a positive number of seconds")
        return float(item.value)

    def _antientropy(self) -> AntiEntropyConfig:
        return AntiEntropyConfig(
            enabled=self._bool("antientropy.enabled", True),
            interval_s=self._seconds("antientropy.interval_s", 60.0),
            bytes_per_s=self._int("antientropy.bytes_per_s", 8 * 1024 * 1024, 1024, 1 << 40),
            max_repairs_per_exchange=self._int(
                "antientropy.max_repairs_per_exchange", 1000, 1, 1_000_000
            ),
        )

    def _served(self) -> tuple[str, ...] | None:
        names = self._strings("roles.served", "role names (A-Z a-z 0-9 _ -)")
        if names is None:
            return None
        if not all(_NAME.match(n) for n in names) or len(set(names)) != len(names):
            self._fail("roles.served", "a list of distinct role names (A-Z a-z 0-9 _ -)")
        return tuple(names)

    def _bool(self, name: str, default: bool) -> bool:
        if name not in self.values:
            return default
        value = self.values[name].value
        if not isinstance(value, bool):
            self._fail(name, "true or false")
        return value

    def _handoff(self) -> HandoffConfig:
        interval = self.values.get("handoff.interval_s")
        ok = interval is None or (
            not isinstance(interval.value, bool)
            and isinstance(interval.value, int | float)
            and 0.05 <= interval.value <= 3600
        )
        if not ok:
            self._fail("handoff.interval_s", "a number of seconds in 0.05..3600")
        return HandoffConfig(
            enabled=self._bool("handoff.enabled", True),
            sloppy_quorum=self._bool("handoff.sloppy_quorum", False),
            max_bytes=self._int("handoff.max_bytes", DEFAULT_HINT_MAX_BYTES, 65536, 1 << 50),
            interval_s=DEFAULT_HANDOFF_INTERVAL_S if interval is None else float(interval.value),
        )

    def _election(self) -> ElectionConfig:
        heartbeat = self._int("election.heartbeat_ms", 150, 1, 60_000)
        timeout = (300, 600)
        if "election.election_timeout_ms" in self.values:
            value = self.values["election.election_timeout_ms"].value
            ok = isinstance(value, list) and len(value) == 2
            ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not (ok and 1 <= value[0] < value[1] <= 600_000):
                self._fail("election.election_timeout_ms", "[MIN, MAX] milliseconds, MIN < MAX")
            timeout = (value[0], value[1])
        if heartbeat >= timeout[0]:
            self._fail_heartbeat(heartbeat, timeout[0])
        return ElectionConfig(heartbeat_ms=heartbeat, election_timeout_ms=timeout)

    def _fail_heartbeat(self, heartbeat: int, minimum: int) -> NoReturn:
        name = "election.heartbeat_ms"
        if name not in self.values:  # only the timeout was set: blame it
            name = "election.election_timeout_ms"
        self._fail(name, f"set so that heartbeat_ms ({heartbeat}) < MIN ({minimum})")

    def _delegated(self, table: str, loader: Callable[[Path], T]) -> T:
        """Validate a ``storage.datadir`` table with its own loader, naming the source."""
        items = {k.split(".")[1]: v for k, v in self.values.items() if k.startswith(table + ".")}
        for key, item in items.items():
            if not isinstance(item.value, str | int | float):  # keeps _toml below total
                self._fail(f"{table}.{key}", "a string or a number")
        try:
            if not any(item.from_env for item in items.values()):
                return loader(self.path)
            with tempfile.TemporaryDirectory(prefix="slurp-config-") as tmp:
                merged = Path(tmp) / "config.toml"
                lines = [f"{k} = {_toml(v.value)}" for k, v in items.items()]
                merged.write_text(f"[{table}]\n" + "\n".join(lines) + "\n", encoding="utf-8")
                return loader(merged)
        except ConfigError as exc:
            key = (exc.field or "").partition(".")[2]
            source = items[key].source if key in items else f"in {self.path}"
            raise ConfigError(f"{exc.message} ({source})", field=exc.field) from None


def _env_key(var: str) -> tuple[str, str]:
    """``(table, key)`` of a ``SLURP_<TABLE>_<KEY>`` variable.

    Raises:
        ConfigError: it names no key; ``field`` is the variable.
    """
    for table, keys in SCHEMA.items():
        for key in keys:
            if var == env_var(table, key):
                return table, key
    suffix = var.removeprefix(ENV_PREFIX).lower()
    near = [
        env_var(t, k)
        for t, keys in SCHEMA.items()
        for k in keys
        if suffix == k or suffix.endswith("_" + k)
    ]
    hint = f"; did you mean {' or '.join(near)}?" if near else ""
    raise ConfigError(
        f"unknown configuration variable {var}: configuration variables are "
        f"SLURP_<TABLE>_<KEY> for the keys of the file{hint}",
        field=var,
    )


def _from_env(kind: str, text: str) -> Any:
    """An environment value as TOML would hold it; unparseable text stays text (and fails)."""
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "int_pair":
            return [int(part) for part in text.split(",")]
    except ValueError:
        return text
    if kind == "bool":
        return {"true": True, "1": True, "false": False, "0": False}.get(text.strip().lower(), text)
    if kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind == "optional_str":
        return text or None
    return text


def render_node_config(cfg: NodeConfig) -> str:
    """The TOML text of ``cfg``, every key written out (``roles.served`` and
    ``backup.schedule`` as a comment when unset). Paths are written as they are in ``cfg``; relative
    ones will be read back relative to the file's directory.

    Only the keys of the file are rendered: ``StorageConfig`` settings that have no key
    (``max_pending``, ``writer_heap_bytes``) read back as their defaults.
    """
    tables: dict[str, dict[str, object]] = {
        "node": {"name": cfg.name, "data_dir": cfg.data_dir},
        "rpc": {"host": cfg.rpc.host, "port": cfg.rpc.port},
        "http": {"host": cfg.http.host, "port": cfg.http.port},
        "discovery": {
            "host": cfg.discovery.host,
            "port": cfg.discovery.port,
            "seeds": [str(seed) for seed in cfg.discovery.seeds],
        },
        "tls": {"ca": cfg.tls.ca, "cert": cfg.tls.cert, "key": cfg.tls.key, "crl": cfg.tls.crl},
        "cluster": {
            "n": cfg.cluster.n,
            "w": cfg.cluster.w,
            "r": cfg.cluster.r,
            "vnodes": cfg.cluster.vnodes,
            "request_timeout_s": float(cfg.cluster.request_timeout_s),
            "max_inflight_requests": cfg.cluster.max_inflight_requests,
            "max_repair_sends": cfg.cluster.max_repair_sends,
        },
        "roles": {"served": None if cfg.roles.served is None else list(cfg.roles.served)},
        "storage": {
            "index_backend": cfg.storage.index.backend,
            "index_refresh_s": float(cfg.storage.index.refresh_interval_s),
            "cache_max_bytes": cfg.storage.cache.max_bytes,
            "cache_ttl_s": float(cfg.storage.cache.ttl_s),
        },
        "keys": {
            "max_key_age_days": cfg.keys.max_key_age_days,
            "data_key_max_records": cfg.keys.data_key_max_records,
            "data_key_max_age_s": float(cfg.keys.data_key_max_age_s),
        },
        "election": {
            "heartbeat_ms": cfg.election.heartbeat_ms,
            "election_timeout_ms": list(cfg.election.election_timeout_ms),
        },
        "backup": {
            "schedule": cfg.backup.schedule,
            "dir": cfg.backup.dir,
            "keep": cfg.backup.keep,
            "incremental": cfg.backup.incremental,
            "restore_max_bytes": cfg.backup.restore_max_bytes,
        },
        "antientropy": {
            "enabled": cfg.antientropy.enabled,
            "interval_s": float(cfg.antientropy.interval_s),
            "bytes_per_s": cfg.antientropy.bytes_per_s,
            "max_repairs_per_exchange": cfg.antientropy.max_repairs_per_exchange,
        },
        "handoff": {
            "enabled": cfg.handoff.enabled,
            "sloppy_quorum": cfg.handoff.sloppy_quorum,
            "max_bytes": cfg.handoff.max_bytes,
            "interval_s": float(cfg.handoff.interval_s),
        },
    }
    parts = ["# slurp node configuration (ARCHITECTURE.md §8); SLURP_<TABLE>_<KEY> overrides.\n"]
    for table, keys in tables.items():
        parts.append(f"\n[{table}]\n")
        for key, value in keys.items():
            if value is None:
                parts.append(f"# {key}: unset, {_UNSET_MEANS[key]}\n")
            else:
                parts.append(f"{key} = {_toml(value)}\n")
    return "".join(parts)


_UNSET_MEANS = {
    "served": "every role in the keyring",
    "schedule": "no scheduled backups",
    "dir": "DATA_DIR/backups",
}
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def _toml(value: object) -> str:
    """One TOML value: string, path, integer, finite float or list of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("TOML values here must be finite")
        return repr(value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return '"' + "".join(_escape(ch) for ch in value) + '"'
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"cannot render {type(value).__name__} as TOML")


def _escape(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\u{ord(ch):04X}"
    return ch
