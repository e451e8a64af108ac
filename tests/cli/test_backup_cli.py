"""``slurp backup create|verify|list``, ``slurp restore``, ``slurp export``, ``slurp import``
(issue 11, embedded part): JSON shapes, exit codes and errors that name the member."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pyrage import x25519
from typer.testing import CliRunner

from cli.main import app
from crypto.roles import DEFAULT_ROLES
from storage.context_store import ContextStore
from tests.cli.conftest import DEV, Slurp
from tests.storage.backup_helpers import reseal

BACKUP_INVALID = "UCXL-400-BACKUP_INVALID"
BACKUP_FOREIGN = "UCXL-400-BACKUP_FOREIGN"
OBSERVER = "ucxl://claude:observer@chorus:auth/*^/notes/standup.md"


def seeded(slurp: Slurp) -> None:
    slurp.seed(
        [
            (DEV, {"summary": "jwt v1"}),
            (DEV, {"summary": "jwt v2"}),
            (OBSERVER, {"summary": "standup"}),
        ]
    )
    slurp.ok("delete", OBSERVER)


def identity_file(tmp_path: Path, name: str = "me.key") -> tuple[Path, x25519.Identity]:
    identity = x25519.Identity.generate()
    path = tmp_path / name
    path.write_text(f"{identity}\n", encoding="utf-8")
    os.chmod(path, 0o600)
    return path, identity


def test_create_list_verify(slurp: Slurp, tmp_path: Path) -> None:
    seeded(slurp)
    made = slurp.json("backup", "create")
    assert made["kind"] == "full"
    assert made["counts"]["versions"] == 4
    assert made["counts"]["tombstones"] == 1
    assert made["file"].startswith(str(slurp.data_dir / "backups"))
    assert Path(made["sidecar"]).exists()
    listed = slurp.json("backup", "list")
    assert [entry["cut"] for entry in listed] == [made["cut"]]
    checked = slurp.json("backup", "verify", made["file"])
    assert checked["ok"] is True
    assert checked["cut"] == made["cut"]
    slurp.ok("put", DEV, "--summary", "jwt v3")
    inc = slurp.json("backup", "create", "--since", made["file"], "--out", str(tmp_path / "i.age"))
    assert inc["kind"] == "incremental"
    assert inc["since"] == made["cut"]
    assert inc["cut"] > made["cut"]
    assert inc["counts"]["versions"] == 5  # jwt v3, and the overlap: the 4 versions above


def test_restore_into_a_fresh_directory_with_keys(slurp: Slurp, tmp_path: Path) -> None:
    seeded(slurp)
    out = tmp_path / "b.age"
    slurp.ok("backup", "create", "--out", str(out), "--with-keys")
    target = tmp_path / "restored"
    admin = slurp.data_dir / "keys" / "admin.key"
    args = ("restore", str(out), "--data-dir", str(target), "--identity", str(admin))
    done = slurp.json(*args)
    assert done["created_node"] is True
    assert done["versions_added"] == 4
    again = Slurp(target, CliRunner())
    assert again.json("get", DEV)["summary"] == "jwt v2"
    assert [h["kind"] for h in again.json("history", OBSERVER)] == ["put", "tombstone"]
    twice = slurp.json(*args)
    assert twice["versions_added"] == 0
    assert twice["versions_skipped"] == 4


def test_verify_names_the_bad_member(slurp: Slurp, tmp_path: Path) -> None:
    seeded(slurp)
    out = tmp_path / "b.age"
    slurp.ok("backup", "create", "--out", str(out))
    admin = ContextStore.open(slurp.data_dir)
    identity = admin.keyring.current_identity("admin")
    admin.close()
    reseal(out, identity, {"purges.jsonl": b'{"oops": 1}\n'})
    error = slurp.error("backup", "verify", str(out), code=BACKUP_INVALID, exit_code=2)
    assert error["field"] == "purges.jsonl"
    assert "purges.jsonl" in error["message"]


def test_restore_of_a_foreign_backup_is_refused(slurp: Slurp, tmp_path: Path) -> None:
    seeded(slurp)
    out = tmp_path / "b.age"
    slurp.ok("backup", "create", "--out", str(out))
    other = tmp_path / "other"
    ContextStore.init(other, DEFAULT_ROLES)
    admin = slurp.data_dir / "keys" / "admin.key"
    error = Slurp(other, CliRunner()).error(
        "restore", str(out), "--identity", str(admin), code=BACKUP_FOREIGN, exit_code=2
    )
    assert error["field"] == "cluster_id"


def test_fresh_restore_needs_an_identity(slurp: Slurp, tmp_path: Path) -> None:
    seeded(slurp)
    out = tmp_path / "b.age"
    slurp.ok("backup", "create", "--out", str(out), "--with-keys")
    error = slurp.error(
        "restore",
        str(out),
        "--data-dir",
        str(tmp_path / "fresh"),
        code="UCXL-400-INVALID_PAYLOAD",
        exit_code=2,
    )
    assert error["field"] == "identity"
    assert not (tmp_path / "fresh").exists()


def test_export_import_between_nodes(slurp: Slurp, tmp_path: Path) -> None:
    seeded(slurp)
    key_path, identity = identity_file(tmp_path)
    out = tmp_path / "x.age"
    pattern = "ucxl://any:any@chorus:auth/*^/"
    made = slurp.json(
        "export", pattern, "--out", str(out), "--recipient", str(identity.to_public()), "--history"
    )
    assert made["records"] == 3  # two of DEV, one of OBSERVER; the tombstone is skipped
    other_dir = tmp_path / "other"
    ContextStore.init(other_dir, DEFAULT_ROLES)
    other = Slurp(other_dir, CliRunner())
    imported = other.json("import", str(out), "--identity", str(key_path))
    assert imported["imported"] == 3
    got = other.json("get", DEV)
    assert got["summary"] == "jwt v2"
    original = slurp.json("get", DEV)
    assert got["metadata"]["imported_from"]["version_id"] == original["version_id"]
    assert got["version_id"] != original["version_id"]


def test_export_as_a_role_keeps_only_what_it_may_read(slurp: Slurp, tmp_path: Path) -> None:
    slurp.seed([(DEV, {"summary": "jwt"}), (OBSERVER, {"summary": "standup"})])
    _, identity = identity_file(tmp_path)
    made = slurp.json(
        "export",
        "ucxl://any:any@chorus:auth/*^/",
        "--out",
        str(tmp_path / "x.age"),
        "--recipient",
        str(identity.to_public()),
        "--as",
        "observer",
    )
    assert made["records"] == 1
    assert made["skipped"] == 1


def test_import_of_a_file_that_does_not_open(slurp: Slurp, tmp_path: Path) -> None:
    bad = tmp_path / "bad.age"
    bad.write_bytes(b"not age at all")
    error = slurp.error("import", str(bad), code="UCXL-400-EXPORT_INVALID", exit_code=2)
    assert error["field"] == "identity"


def test_backup_commands_are_refused_with_remote_options() -> None:
    result = CliRunner().invoke(app, ["--node", "127.0.0.1:1", "backup", "list", "--json"])
    assert result.exit_code == 2
    assert "works on a local data directory only" in result.stderr


def test_export_as_an_unknown_role_is_refused(slurp: Slurp, tmp_path: Path) -> None:
    _, identity = identity_file(tmp_path)
    error = slurp.error(
        "export",
        "ucxl://any:any@chorus:auth/*^/",
        "--out",
        str(tmp_path / "x.age"),
        "--recipient",
        str(identity.to_public()),
        "--as",
        "nobody",
        code="UCXL-403-FORBIDDEN",
        exit_code=2,
    )
    assert error["field"] == "role"
    assert not (tmp_path / "x.age").exists()


def _cluster_up(*args: str) -> tuple[int, dict[str, object], str]:
    result = CliRunner().invoke(app, ["cluster", "up", *args, "--json"])
    assert "Traceback" not in result.stderr
    return result.exit_code, json.loads(result.stdout)["error"], result.stderr


def test_cluster_up_restore_refuses_before_it_makes_anything(slurp: Slurp, tmp_path: Path) -> None:
    """``cluster up --restore`` (no process is started here): a backup without keys, an
    ``--identity`` without ``--restore`` and a directory that is not empty are refused
    with a clear error, and no cluster directory is made."""
    seeded(slurp)
    admin_key = str(slurp.data_dir / "keys" / "admin.key")
    plain = slurp.json("backup", "create", "--out", str(tmp_path / "plain.age"))["file"]
    keyed = slurp.json("backup", "create", "--out", str(tmp_path / "k.age"), "--with-keys")
    target = tmp_path / "new"
    code, error, stderr = _cluster_up("--dir", str(target), "--restore", plain,
                                      "--identity", admin_key)  # fmt: skip
    assert code == 2
    assert error["code"] == "UCXL-400-INVALID_PAYLOAD"
    assert "made without --with-keys" in str(error["message"])
    assert stderr.startswith("UCXL-400-INVALID_PAYLOAD: ")
    assert not target.exists()
    code, error, _ = _cluster_up("--dir", str(target), "--identity", admin_key)
    assert code == 2
    assert error["field"] == "identity"
    assert not target.exists()
    target.mkdir()
    (target / "something").write_text("x", encoding="utf-8")
    code, error, _ = _cluster_up("--dir", str(target), "--restore", keyed["file"],
                                 "--identity", admin_key)  # fmt: skip
    assert code != 0
    assert "is not empty" in str(error["message"])
    assert sorted(p.name for p in target.iterdir()) == ["something"]
