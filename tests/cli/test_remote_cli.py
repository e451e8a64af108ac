"""``slurp --node``/``--profile``: the data commands against a running (fake) node print
what embedded mode prints, and exit the same way; embedded-only commands refuse clearly.

The node is ``tests/node/fake_node.py`` serving over mutual TLS from a thread, in front of
its own data directory; the CLI runs in-process and talks to it through the SDK.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from cli.main import app
from crypto.ca import CertificateAuthority
from crypto.roles import DEFAULT_ROLES
from crypto.tls import TlsFiles
from storage import backup_io
from storage.context_store import ContextStore
from tests.cli.conftest import DEV, Slurp
from tests.node.fake_node import FakeNode, serving_in_thread

INVALID_PAYLOAD = "UCXL-400-INVALID_PAYLOAD"
VOLATILE = frozenset({"version_id", "parent_version", "created_at", "updated_at", "created_by"})


@dataclass
class RemoteSlurp(Slurp):
    """``slurp`` with remote options before the command (and a data dir that is not there)."""

    options: list[str] = field(default_factory=list)

    def run(self, *args: str, input: str | None = None) -> Result:
        return self.runner.invoke(
            app, ["--data-dir", str(self.data_dir), *self.options, *args], input=input
        )


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    authority = CertificateAuthority.init(tmp_path / "ca")
    authority.issue_node("node-a", ["127.0.0.1", "localhost"])
    authority.issue_client("alice", ["admin", "backend_developer"])
    return authority


@pytest.fixture
def port(tmp_path: Path, ca: CertificateAuthority) -> Iterator[int]:
    """A fake node on 127.0.0.1 in front of a fresh data directory of its own."""
    ContextStore.init(tmp_path / "remote", DEFAULT_ROLES)
    with (
        ContextStore.open(tmp_path / "remote") as store,
        serving_in_thread(FakeNode(store), TlsFiles.in_directory(ca.directory, "node-a")) as bound,
    ):
        yield bound


def tls_options(ca: CertificateAuthority) -> list[str]:
    directory = ca.directory
    return ["--ca", f"{directory}/ca.crt", "--cert", f"{directory}/alice.crt",
            "--key", f"{directory}/alice.key"]  # fmt: skip


@pytest.fixture
def remote(tmp_path: Path, ca: CertificateAuthority, port: int) -> RemoteSlurp:
    options = ["--node", f"127.0.0.1:{port}", *tls_options(ca)]
    return RemoteSlurp(tmp_path / "absent", CliRunner(), options)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stable(value: Any) -> Any:
    """``value`` with the values that differ between two nodes (ids, clocks) blanked."""
    if isinstance(value, dict):
        return {k: "…" if k in VOLATILE else stable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [stable(item) for item in value]
    return value


SESSION: list[tuple[str, ...]] = [
    ("put", DEV, "--summary", "JWT signing moves to Ed25519", "--content", "sign()",
     "--tag", "jwt", "--tech", "python"),
    ("put", DEV, "--summary", "second thoughts", "--role", "observer"),
    ("get", DEV),
    ("get", DEV.replace("/*^", "/*~1")),
    ("get", "ucxl://any:any@chorus:auth/*^/src/auth/jwt.py", "--as", "observer"),
    ("history", DEV),
    ("ls", "ucxl://any:any@chorus:any/*^"),
    ("search", "Ed25519", "--project", "chorus"),
    ("delete", DEV),
    ("ls", "ucxl://any:any@chorus:any/*^", "--deleted"),
    ("purge", DEV, "--yes"),
]  # fmt: skip
FAILURES: list[tuple[tuple[str, ...], str]] = [
    (("get", DEV), "UCXL-404-NOT_FOUND"),
    (("get", DEV.replace("/*^", "/*~7")), "UCXL-404-NOT_FOUND"),
    (("get", "ucxl://claude@chorus/*^"), "UCXL-400-INVALID_ADDRESS"),
    (("put", DEV, "--summary", "x", "--role", "nobody"), INVALID_PAYLOAD),
    (("put", DEV.replace("/*^", "/*~1"), "--summary", "x"), "UCXL-400-INVALID_ADDRESS"),
    (("history", "ucxl://a:observer@p:t/*^/none"), "UCXL-404-NOT_FOUND"),
    (("delete", "ucxl://a:observer@p:t/*^/none"), "UCXL-404-NOT_FOUND"),
    (("search", "x", "--as", "nobody"), "UCXL-403-FORBIDDEN"),
]


def test_a_session_prints_what_embedded_mode_prints(slurp: Slurp, remote: RemoteSlurp) -> None:
    for args in SESSION:
        assert stable(remote.json(*args)) == stable(slurp.json(*args)), args


@pytest.mark.parametrize(("args", "code"), FAILURES)
def test_errors_are_reported_as_in_embedded_mode(
    slurp: Slurp, remote: RemoteSlurp, args: tuple[str, ...], code: str
) -> None:
    exit_code = 2
    assert remote.error(*args, code=code, exit_code=exit_code) == slurp.error(
        *args, code=code, exit_code=exit_code
    )


def test_text_output_matches_embedded_mode(slurp: Slurp, remote: RemoteSlurp) -> None:
    def blank(text: str) -> str:
        text = re.sub(r"[0-9a-f]{12}-[0-9a-f]{6}-[0-9a-z]+", "VID", text)
        return re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z|@[0-9a-z]+\b", "T", text)

    for args in SESSION[:3]:
        assert blank(remote.ok(*args).stdout) == blank(slurp.ok(*args).stdout), args


def test_stats_and_status_show_the_node_status(remote: RemoteSlurp) -> None:
    status = remote.json("status")
    assert status["name"] == "node-a"
    assert set(status) >= {"node_id", "members", "ring", "quorum"}
    assert remote.json("stats") == status
    assert "name: node-a" in remote.ok("status").stdout


def test_status_needs_a_node(slurp: Slurp) -> None:
    error = slurp.error("status", code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "node"


def test_a_client_profile_works(
    tmp_path: Path, ca: CertificateAuthority, port: int, slurp: Slurp
) -> None:
    profile = ca.directory / "client.toml"
    profile.write_text(
        f'seeds = ["127.0.0.1:{closed_port()}", "127.0.0.1:{port}"]\n\n'
        '[tls]\nca = "ca.crt"\ncert = "alice.crt"\nkey = "alice.key"\n',
        encoding="utf-8",
    )
    cli = RemoteSlurp(tmp_path / "absent", CliRunner(), ["--profile", str(profile)])
    ref = cli.json("put", DEV, "--summary", "via a profile")
    assert ref["version"] == 1
    assert cli.json("get", DEV)["summary"] == "via a profile"


def test_node_with_a_profile_picks_that_node(
    tmp_path: Path, ca: CertificateAuthority, port: int
) -> None:
    profile = ca.directory / "client.toml"
    profile.write_text(
        f'seeds = ["127.0.0.1:{closed_port()}"]\n\n'
        '[tls]\nca = "ca.crt"\ncert = "alice.crt"\nkey = "alice.key"\n',
        encoding="utf-8",
    )
    alone = RemoteSlurp(tmp_path / "absent", CliRunner(), ["--profile", str(profile)])
    alone.error("ls", DEV, code="UCXL-503-UNAVAILABLE", exit_code=1)
    picked = RemoteSlurp(
        tmp_path / "absent",
        CliRunner(),
        ["--profile", str(profile), "--node", f"127.0.0.1:{port}"],
    )
    assert picked.json("ls", DEV) == []


def test_an_unreachable_node_is_unavailable(tmp_path: Path, ca: CertificateAuthority) -> None:
    options = ["--node", f"127.0.0.1:{closed_port()}", *tls_options(ca)]
    cli = RemoteSlurp(tmp_path / "absent", CliRunner(), options)
    error = cli.error("get", DEV, code="UCXL-503-UNAVAILABLE", exit_code=1)
    assert "no node answered" in error["message"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (["--node", "127.0.0.1"], "node"),
        (["--node", "127.0.0.1:7000", "--ca", "ca.crt"], "cert"),
        (["--cert", "alice.crt"], "node"),
        (["--profile", "nowhere.toml"], "profile"),
    ],
)
def test_bad_remote_options_are_named(
    tmp_path: Path, ca: CertificateAuthority, options: list[str], field: str
) -> None:
    cli = RemoteSlurp(tmp_path / "absent", CliRunner(), options)
    assert cli.error("ls", DEV, code=INVALID_PAYLOAD, exit_code=2)["field"] == field


def test_missing_tls_files_are_named(tmp_path: Path, ca: CertificateAuthority) -> None:
    options = ["--node", "127.0.0.1:7000", *tls_options(ca)]
    options[options.index("--key") + 1] = str(tmp_path / "lost.key")
    cli = RemoteSlurp(tmp_path / "absent", CliRunner(), options)
    assert cli.error("ls", DEV, code=INVALID_PAYLOAD, exit_code=2)["field"] == "key"


@pytest.mark.parametrize(
    "args",
    [
        ("init",),
        ("compact",),
        ("index", "rebuild"),
        ("keys", "list"),
        ("audit", "verify"),
        ("ca", "list", "--dir", "somewhere"),
        ("get", DEV, "--encrypted"),
        ("purge", DEV, "--yes", "--share-file", "share.age"),
    ],
)
def test_embedded_only_commands_refuse_remote_options(
    tmp_path: Path, ca: CertificateAuthority, args: tuple[str, ...]
) -> None:
    options = ["--node", f"127.0.0.1:{closed_port()}", *tls_options(ca)]
    cli = RemoteSlurp(tmp_path / "absent", CliRunner(), options)
    error = cli.error(*args, code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "node"
    assert "--node" in error["message"]
    assert f"slurp {args[0]}" in error["message"]
    assert not (tmp_path / "absent").exists()


def test_a_cluster_backup_since_needs_the_files_sidecar(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """``--since FILE`` with --node/--profile reads FILE's cut from ``FILE.json`` before
    any connection (the node here is closed): a missing file, a missing sidecar, or a
    sidecar of another file is refused naming ``since``."""
    options = ["--node", f"127.0.0.1:{closed_port()}", *tls_options(ca)]
    cli = RemoteSlurp(tmp_path / "absent", CliRunner(), options)
    old = tmp_path / "old.slurp-backup.age"
    error = cli.error("backup", "create", "--since", str(old), code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "since"
    assert "no such backup file" in error["message"]
    old.write_bytes(b"age-encryption.org/v1\n")
    error = cli.error("backup", "create", "--since", str(old), code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "since"
    assert "has no sidecar old.slurp-backup.age.json" in error["message"]
    backup_io.write_sidecar(old, {"cut": "01a22e682e1e-000000-n1", "file_sha256": "0" * 64})
    error = cli.error("backup", "create", "--since", str(old), code="UCXL-400-BACKUP_INVALID",
                      exit_code=2)  # fmt: skip
    assert error["field"] == "since"
    assert "does not belong to" in error["message"]
    assert not (tmp_path / "absent").exists()
