"""Client configuration: seeds, TLS files, timeouts, and the client profile (TOML).

Owns: ``ClientConfig`` (validated on construction), ``parse_seed``, ``client_tls`` and
``load_profile``. Errors are ``InvalidPayload`` whose ``field`` names the offending key
(``seeds``, ``tls.cert``...). Must not know: sockets, trio, RPC methods. Import it through
``node.client``, which re-exports it.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crypto.ca import CRL_FILE
from crypto.tls import TlsFiles
from node.rpc.api import DEFAULT_TIMEOUT_S
from storage.errors import InvalidPayload

DEFAULT_CONNECT_TIMEOUT_S = 3.0
PROFILE_KEYS = frozenset({"seeds", "timeout_s", "connect_timeout_s", "tls"})
PROFILE_TLS_KEYS = frozenset({"ca", "cert", "key", "crl"})

Seed = tuple[str, int]


@dataclass(frozen=True)
class ClientConfig:
    """Where the cluster is and who we are.

    Attributes:
        seeds: ``(host, port)`` of the nodes to try, in order (at least one).
        tls: Our CA certificate, client certificate and key, and optionally the CRL.
        timeout_s: How long one call waits for its answer (also the node's deadline).
        connect_timeout_s: Bound on connecting to one seed (TCP, TLS and hello).

    Raises:
        InvalidPayload: No seeds, a malformed seed, or a non-positive timeout.
    """

    seeds: tuple[Seed, ...]
    tls: TlsFiles
    timeout_s: float = DEFAULT_TIMEOUT_S
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.seeds:
            raise InvalidPayload("at least one seed is needed", field="seeds")
        for host, port in self.seeds:
            if not host or not 0 < port < 65536:
                raise InvalidPayload(f"bad seed {host}:{port}", field="seeds")
        for name in ("timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise InvalidPayload(f"{name} must be a positive number", field=name)


def parse_seed(text: str, *, field: str = "seeds") -> Seed:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a seed.

    Raises:
        InvalidPayload: Not of that form; ``field`` names where it came from.
    """
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidPayload(f"{text!r} is not HOST:PORT", field=field)
    return host, int(port)


def client_tls(
    ca: Path, cert: Path, key: Path, crl: Path | None = None, *, field_prefix: str = "tls."
) -> TlsFiles:
    """A client's TLS files, checked to exist; the CRL defaults to ``ca.crl`` beside ``ca``.

    Without a CRL the client does not check the node's certificate for revocation (the
    nodes check clients' certificates either way).

    Raises:
        InvalidPayload: A file is missing; ``field`` is ``field_prefix`` + ca/cert/key/crl.
    """
    if crl is None and (ca.parent / CRL_FILE).is_file():
        crl = ca.parent / CRL_FILE
    for name, path in (("ca", ca), ("cert", cert), ("key", key), ("crl", crl)):
        if path is not None and not path.is_file():
            raise InvalidPayload(f"no such file: {path}", field=field_prefix + name)
    return TlsFiles(ca_cert=ca, cert=cert, key=key, crl=crl)


def load_profile(path: Path) -> ClientConfig:
    """Read a client profile: TOML, paths relative to the profile's directory::

        seeds = ["10.0.0.1:7000", "10.0.0.2:7000"]
        timeout_s = 5.0            # optional
        connect_timeout_s = 3.0    # optional
        [tls]
        ca = "ca.crt"
        cert = "alice.crt"
        key = "alice.key"
        crl = "ca.crl"             # optional; default ca.crl beside ca when present

    Raises:
        InvalidPayload: Unreadable or not TOML (field ``profile``), an unknown, missing or
            mistyped key (field: the key, as ``tls.cert``), a missing file, a bad seed.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidPayload(f"cannot read {path}: {exc.strerror}", field="profile") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidPayload(f"{path} is not valid TOML: {exc}", field="profile") from None
    _only_keys(data, PROFILE_KEYS, "")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, str) for s in seeds):
        raise InvalidPayload("seeds must be a non-empty list of HOST:PORT", field="seeds")
    tls = data.get("tls")
    if not isinstance(tls, dict):
        raise InvalidPayload("the [tls] table (ca, cert, key) is required", field="tls")
    _only_keys(tls, PROFILE_TLS_KEYS, "tls.")

    def file(key: str) -> Path:
        value = tls.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidPayload(f"[tls] {key} must be a file path", field=f"tls.{key}")
        return path.parent / Path(value).expanduser()

    crl = file("crl") if "crl" in tls else None
    return ClientConfig(
        seeds=tuple(parse_seed(seed) for seed in seeds),
        tls=client_tls(file("ca"), file("cert"), file("key"), crl),
        timeout_s=data.get("timeout_s", DEFAULT_TIMEOUT_S),
        connect_timeout_s=data.get("connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S),
    )


def _only_keys(table: dict[str, Any], allowed: frozenset[str], prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:  # a typo must not be ignored
        raise InvalidPayload(f"unknown key {prefix}{unknown[0]}", field=prefix + unknown[0])
