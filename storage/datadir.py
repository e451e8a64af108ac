"""The data directory of one node (ARCHITECTURE.md §4) and its storage settings.

Owns the layout ``DATA_DIR/{config.toml, db/, index/, keys/, backups/}``, reading the
``[storage]`` and ``[keys]`` tables of ``config.toml``, and validating them with errors
that name the key. ``[keys]`` holds the rotation warning age and the data-key policy of
record sealing (``crypto.sealing.SealPolicy``: records per data key, and its age).
Must not open LevelDB, the index or the keyring (the ContextStore does).
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crypto.sealing import DEFAULT_MAX_AGE_S, DEFAULT_MAX_RECORDS, SealPolicy
from storage.cache import CacheConfig
from storage.errors import InvalidPayload
from storage.index import IndexConfig

DEFAULT_HOME_ENV = "SLURP_HOME"
_CONFIG_TEMPLATE = """\
# slurp node configuration (ARCHITECTURE.md §8). Every key has a default.
[storage]
index_backend = "{backend}"      # "tantivy" (default) or "whoosh"
index_refresh_s = 1.0            # a search sees a write at most this long after it
cache_max_bytes = 67108864       # decrypted-record cache bound
cache_ttl_s = 300.0

[keys]
max_key_age_days = 90            # `slurp stats` warns when a role key is older; 0: never
data_key_max_records = 4096      # records sealed under one data key before a new one
data_key_max_age_s = 3600.0      # seconds a data key seals records before a new one
"""
DEFAULT_MAX_KEY_AGE_DAYS = 90
# A data key seals records under random 96-bit ChaCha20-Poly1305 nonces; 2**24 records
# keep the chance of a nonce collision under one key below 2**-48 (birthday bound
# n**2 / 2**97), far inside the usual 2**32-messages-per-key limit for random nonces.
MAX_DATA_KEY_RECORDS = 1 << 24
MAX_DATA_KEY_AGE_S = 365 * 24 * 3600.0


class ConfigError(InvalidPayload):
    """config.toml is unreadable or a key holds a bad value; ``field`` names the key."""


@dataclass(frozen=True)
class StorageConfig:
    """The validated ``[storage]`` table."""

    index: IndexConfig = field(default_factory=IndexConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


@dataclass(frozen=True)
class KeysConfig:
    """The validated ``[keys]`` table."""

    max_key_age_days: int = DEFAULT_MAX_KEY_AGE_DAYS  # 0: no rotation-due warning
    data_key_max_records: int = DEFAULT_MAX_RECORDS  # crypto.sealing.SealPolicy.max_records
    data_key_max_age_s: float = DEFAULT_MAX_AGE_S  # crypto.sealing.SealPolicy.max_age_s

    def seal_policy(self) -> SealPolicy:
        """The data-key policy these settings give (the cache bounds keep their defaults)."""
        return SealPolicy(max_records=self.data_key_max_records, max_age_s=self.data_key_max_age_s)


@dataclass(frozen=True)
class DataDir:
    """Paths of one data directory."""

    root: Path

    @property
    def config(self) -> Path:
        """``config.toml``."""
        return self.root / "config.toml"

    @property
    def db(self) -> Path:
        """The LevelDB directory."""
        return self.root / "db"

    @property
    def index(self) -> Path:
        """The derived full-text index."""
        return self.root / "index"

    @property
    def keys(self) -> Path:
        """Identity files (0600)."""
        return self.root / "keys"

    @property
    def backups(self) -> Path:
        """Backups (cluster issue)."""
        return self.root / "backups"

    def exists(self) -> bool:
        """Whether ``slurp init`` ran here."""
        return (self.keys / "keyring.json").exists() and self.db.exists()

    def create_layout(self, *, backend: str = "tantivy") -> None:
        """Make the directories and write a default ``config.toml`` (keeps an existing one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in (self.db, self.index, self.backups):
            sub.mkdir(exist_ok=True)
        self.keys.mkdir(mode=0o700, exist_ok=True)
        if not self.config.exists():
            self.config.write_text(_CONFIG_TEMPLATE.format(backend=backend), encoding="utf-8")


def default_data_dir() -> Path:
    """``$SLURP_HOME``, else ``~/.local/share/slurp``."""
    env = os.environ.get(DEFAULT_HOME_ENV)
    return Path(env) if env else Path.home() / ".local" / "share" / "slurp"


def load_storage_config(path: Path) -> StorageConfig:
    """Read and validate the ``[storage]`` table of a config file (missing file: defaults).

    Raises:
        ConfigError: unreadable TOML, an unknown key, or a bad value (``field`` names it).
    """
    table = _table(
        path, "storage", {"index_backend", "index_refresh_s", "cache_max_bytes", "cache_ttl_s"}
    )
    backend = table.get("index_backend", "tantivy")
    if backend not in ("tantivy", "whoosh"):
        raise ConfigError(
            f"storage.index_backend must be 'tantivy' or 'whoosh', not {backend!r}",
            field="storage.index_backend",
        )
    refresh = _positive(table, "index_refresh_s", 1.0)
    cache_bytes = int(_positive(table, "cache_max_bytes", 64 * 1024 * 1024))
    cache_ttl = _positive(table, "cache_ttl_s", 300.0)
    return StorageConfig(
        index=IndexConfig(backend=backend, refresh_interval_s=refresh),
        cache=CacheConfig(max_bytes=cache_bytes, ttl_s=cache_ttl),
    )


def load_keys_config(path: Path) -> KeysConfig:
    """Read and validate the ``[keys]`` table of a config file (missing file: defaults).

    Raises:
        ConfigError: unreadable TOML, an unknown key, or a bad value (``field`` names it).
    """
    table = _table(path, "keys", {"max_key_age_days", "data_key_max_records", "data_key_max_age_s"})
    days = table.get("max_key_age_days", DEFAULT_MAX_KEY_AGE_DAYS)
    if isinstance(days, bool) or not isinstance(days, int) or days < 0:
        raise ConfigError(
            "keys.max_key_age_days must be a whole number of days >= 0 (0: never warn)",
            field="keys.max_key_age_days",
        )
    records = table.get("data_key_max_records", DEFAULT_MAX_RECORDS)
    if not _whole_in(records, 1, MAX_DATA_KEY_RECORDS):
        raise ConfigError(
            f"keys.data_key_max_records must be a whole number of records in"
            f" 1..{MAX_DATA_KEY_RECORDS}",
            field="keys.data_key_max_records",
        )
    age = table.get("data_key_max_age_s", DEFAULT_MAX_AGE_S)
    if (
        isinstance(age, bool)
        or not isinstance(age, int | float)
        or not 0 < age <= MAX_DATA_KEY_AGE_S
    ):
        raise ConfigError(
            f"keys.data_key_max_age_s must be a number of seconds > 0 and at most"
            f" {MAX_DATA_KEY_AGE_S:.0f} (a year)",
            field="keys.data_key_max_age_s",
        )
    return KeysConfig(
        max_key_age_days=days, data_key_max_records=records, data_key_max_age_s=float(age)
    )


def _whole_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _table(path: Path, name: str, known: set[str]) -> dict[str, Any]:
    """The ``[name]`` table of a config file ({} when the file or table is missing)."""
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}", field="config") from None
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table", field=name)
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]} in {path}", field=f"{name}.{unknown[0]}"
        )
    return table


def _positive(table: dict[str, Any], key: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"storage.{key} must be a positive number", field=f"storage.{key}")
    return float(value)
