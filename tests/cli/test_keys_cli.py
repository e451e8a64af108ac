"""``slurp keys``: Shamir split and combine of the admin identity, forgetting it, listing,
rotation, rotation-due warnings and passphrase protection (issue "Keys and trust").

Shares are SLIP-39 mnemonics; combining checks the rebuilt identity against the admin
recipient on record. Bad share sets fail with ``UCXL-400-SHARES_INVALID``.
"""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from shamir_mnemonic.wordlist import WORD_INDEX_MAP, WORDLIST
from typer.testing import CliRunner

from crypto.key_versions import fingerprint
from crypto.keyring import read_identity_file
from crypto.roles import DEFAULT_ROLES, parse_role_spec
from storage.context_store import ContextStore
from tests.cli.conftest import DEV, Slurp

SHARES_INVALID = "UCXL-400-SHARES_INVALID"
FORBIDDEN = "UCXL-403-FORBIDDEN"
INVALID_PAYLOAD = "UCXL-400-INVALID_PAYLOAD"
KEYRING_UNUSABLE = "UCXL-412-KEYRING_UNUSABLE"
OBSERVER = "ucxl://claude:observer@chorus:auth/*^/notes/standup.md"
DEFAULT_ROLE_NAMES = ["admin", "senior_software_architect", "backend_developer", "observer"]
ISO_SECONDS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
AGE_HEADER = b"age-encryption.org/v1\n"
WORDS_PER_SHARE = 33  # SLIP-39 share of a 256-bit secret


def lines(*shares: str) -> str:
    """Mnemonics as ``keys combine`` reads them on stdin: one per line."""
    return "".join(f"{share}\n" for share in shares)


def admin_recipient(slurp: Slurp) -> str:
    """The admin recipient on record (``stats``)."""
    roles = {role["name"]: role for role in slurp.json("stats")["roles"]}
    recipient = roles["admin"]["recipient"]
    assert isinstance(recipient, str)
    return recipient


def role_listing(slurp: Slurp, name: str) -> dict[str, Any]:
    """One role of ``keys list --json``."""
    (found,) = [role for role in slurp.json("keys", "list")["roles"] if role["name"] == name]
    assert isinstance(found, dict)
    return found


def audit_ops(slurp: Slurp) -> list[tuple[str, str]]:
    """(op, outcome) of every audit entry, oldest first."""
    return [(e["op"], e["outcome"]) for e in slurp.json("audit", "tail", "-n", "1000")]


# -- split ---------------------------------------------------------------------------------


def test_split_json_shape(slurp: Slurp) -> None:
    split = slurp.json("keys", "split")
    assert set(split) == {"admin_recipient", "threshold", "shares", "files", "forgot_admin"}
    assert split["admin_recipient"] == admin_recipient(slurp)
    assert split["admin_recipient"].startswith("age1")
    assert split["threshold"] == 3
    assert len(split["shares"]) == 5
    assert len(set(split["shares"])) == 5
    for share in split["shares"]:
        words = share.split(" ")
        assert len(words) == WORDS_PER_SHARE
        assert all(word in WORD_INDEX_MAP for word in words)
    assert split["files"] == []
    assert split["forgot_admin"] is False
    keys = slurp.data_dir / "keys"
    assert (keys / "admin.key").exists()
    assert not (keys / "admin.share.age").exists()
    assert not (slurp.data_dir / "backups" / "admin-shares").exists()
    assert audit_ops(slurp) == [("keys.split", "ok")]


def test_split_text_output_prints_every_share(slurp: Slurp) -> None:
    out = slurp.ok("keys", "split", "--threshold", "2", "--shares", "3").stdout
    assert f"admin recipient: {admin_recipient(slurp)}" in out
    assert "any 2 of these 3 shares rebuild it" in out
    for number in (1, 2, 3):
        assert f"share {number}:" in out


@pytest.mark.parametrize(("threshold", "shares"), [("4", "3"), ("0", "3"), ("1", "3"), ("3", "17")])
def test_split_refuses_bad_counts(slurp: Slurp, threshold: str, shares: str) -> None:
    slurp.error(
        "keys",
        "split",
        "--threshold",
        threshold,
        "--shares",
        shares,
        code=SHARES_INVALID,
        exit_code=2,
    )
    assert (slurp.data_dir / "keys" / "admin.key").exists()


# -- combine -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "picked",
    [(0, 1, 2), (2, 3, 4), (0, 2, 4), (4, 1, 3), (0, 1, 2, 3, 4), (3, 3, 0, 1)],
    ids=["first", "last", "every-other", "unordered", "all-five", "with-a-duplicate"],
)
def test_any_threshold_shares_combine_to_the_admin_recipient(
    slurp: Slurp, picked: tuple[int, ...]
) -> None:
    split = slurp.json("keys", "split")
    chosen = [split["shares"][i] for i in picked]
    assert slurp.json("keys", "combine", input=lines(*chosen)) == {
        "recipient": split["admin_recipient"]
    }
    assert audit_ops(slurp)[-1] == ("keys.combine", "ok")


def test_combine_text_output(slurp: Slurp) -> None:
    split = slurp.json("keys", "split", "--threshold", "2", "--shares", "2")
    out = slurp.ok("keys", "combine", input=lines(*split["shares"])).stdout
    assert f"rebuilt the admin identity: {split['admin_recipient']} (verified" in out


@pytest.mark.parametrize(
    ("picked", "message"),
    [((), "no shares given"), ((0, 1), "need 3 shares, got 2"), ((2, 2, 2), "need 3 shares")],
    ids=["none", "two", "one-three-times"],
)
def test_too_few_shares_are_refused(slurp: Slurp, picked: tuple[int, ...], message: str) -> None:
    split = slurp.json("keys", "split")
    chosen = [split["shares"][i] for i in picked]
    error = slurp.error("keys", "combine", input=lines(*chosen), code=SHARES_INVALID, exit_code=2)
    assert error["field"] == "shares"
    assert message in error["message"]
    assert audit_ops(slurp)[-1] == ("keys.combine", "failed")


def _replace_a_word(share: str) -> str:
    words = share.split(" ")
    words[10] = WORDLIST[(WORD_INDEX_MAP[words[10]] + 1) % len(WORDLIST)]
    return " ".join(words)


def _swap_two_words(share: str) -> str:
    words = share.split(" ")
    i = next(i for i in range(5, len(words) - 1) if words[i] != words[i + 1])
    words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


def _drop_a_word(share: str) -> str:
    return " ".join(share.split(" ")[:-1])


def _not_a_share(share: str) -> str:
    return "this is not a share"


@pytest.mark.parametrize("corrupt", [_replace_a_word, _swap_two_words, _drop_a_word, _not_a_share])
def test_a_corrupted_share_is_refused_by_position(
    slurp: Slurp, corrupt: Callable[[str], str]
) -> None:
    split = slurp.json("keys", "split")
    good = split["shares"]
    bad = corrupt(good[1])
    assert bad != good[1]
    error = slurp.error(
        "keys", "combine", input=lines(good[0], bad, good[2]), code=SHARES_INVALID, exit_code=2
    )
    assert "share 2 is corrupted" in error["message"]
    assert good[1] not in error["message"]
    assert bad not in error["message"]
    # the intact shares still work
    assert slurp.json("keys", "combine", input=lines(good[0], good[2], good[3]))


def test_shares_of_two_different_splits_do_not_mix(slurp: Slurp) -> None:
    first = slurp.json("keys", "split")["shares"]
    second = slurp.json("keys", "split")["shares"]
    error = slurp.error(
        "keys",
        "combine",
        input=lines(first[0], first[1], second[2]),
        code=SHARES_INVALID,
        exit_code=2,
    )
    assert "different splits" in error["message"]
    recipient = {"recipient": admin_recipient(slurp)}
    assert slurp.json("keys", "combine", input=lines(*first[:3])) == recipient
    assert slurp.json("keys", "combine", input=lines(*second[2:])) == recipient


def test_shares_of_another_nodes_admin_do_not_match_the_record(
    slurp: Slurp, tmp_path: Path
) -> None:
    other = Slurp(tmp_path / "other", CliRunner())
    ContextStore.init(other.data_dir, DEFAULT_ROLES)
    foreign = other.json("keys", "split")["shares"]
    error = slurp.error(
        "keys", "combine", input=lines(*foreign[:3]), code=SHARES_INVALID, exit_code=2
    )
    assert "does not match the recorded recipient" in error["message"]


def test_combine_reports_an_unreadable_share_file(slurp: Slurp, tmp_path: Path) -> None:
    missing = tmp_path / "share-9.age"
    error = slurp.error(
        "keys", "combine", "--share-file", str(missing), code=INVALID_PAYLOAD, exit_code=2
    )
    assert error["field"] == "share_file"
    assert str(missing) in error["message"]


# -- share files for holders (age interop) -------------------------------------------------


def age_tool(name: str) -> str:
    """The path of an ``age`` tool (scripts/test installs the Debian package)."""
    found = shutil.which(name)
    assert found is not None, f"{name} is not installed: apt-get install age"
    return found


def make_holder(directory: Path, name: str) -> tuple[Path, str]:
    """An identity file made by ``age-keygen -o`` and its recipient."""
    path = directory / f"{name}.txt"
    subprocess.run(
        [age_tool("age-keygen"), "-o", str(path)], check=True, capture_output=True, timeout=30
    )
    recipient = subprocess.run(
        [age_tool("age-keygen"), "-y", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    assert recipient.startswith("age1")
    return path, recipient


def age_decrypt(identity: Path, file: Path) -> subprocess.CompletedProcess[str]:
    """``age -d -i IDENTITY FILE``."""
    return subprocess.run(
        [age_tool("age"), "-d", "-i", str(identity), str(file)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.interop
def test_split_to_holders_writes_share_files_age_opens(slurp: Slurp, tmp_path: Path) -> None:
    holders = [make_holder(tmp_path, f"holder-{i}") for i in range(1, 6)]
    to = [arg for _, recipient in holders for arg in ("--to", recipient)]
    split = slurp.json("keys", "split", *to)
    out_dir = slurp.data_dir / "backups" / "admin-shares"
    files = [out_dir / f"share-{i}.age" for i in range(1, 6)]
    assert split["files"] == [str(f) for f in files]
    for (identity, _), share, file in zip(holders, split["shares"], files, strict=True):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600
        assert file.read_bytes().startswith(AGE_HEADER)
        opened = age_decrypt(identity, file)
        assert opened.returncode == 0, opened.stderr
        assert opened.stdout == share
    assert age_decrypt(holders[0][0], files[1]).returncode != 0

    # holders 2, 4 and 5 bring their files and identities to this node
    picked = [1, 3, 4]
    args = [a for i in picked for a in ("--share-file", str(files[i]))]
    args += [a for i in picked for a in ("--identity", str(holders[i][0]))]
    assert slurp.json("keys", "combine", *args) == {"recipient": split["admin_recipient"]}

    # a file no given identity opens, and a tampered file, are bad shares (no crash)
    error = slurp.error(
        "keys",
        "combine",
        *args,
        "--share-file",
        str(files[0]),
        code=SHARES_INVALID,
        exit_code=2,
    )
    assert str(files[0]) in error["message"]
    tampered = tmp_path / "tampered.age"
    data = bytearray(files[2].read_bytes())
    data[-5] ^= 0x01
    tampered.write_bytes(bytes(data))
    slurp.error(
        "keys",
        "combine",
        "--share-file",
        str(tampered),
        "--identity",
        str(holders[2][0]),
        code=SHARES_INVALID,
        exit_code=2,
    )


@pytest.mark.interop
def test_split_to_holders_in_another_directory_then_purge_with_share_files(
    slurp: Slurp, tmp_path: Path
) -> None:
    slurp.seed([(DEV, {"summary": "written before the split"})])
    holders = [make_holder(tmp_path, f"holder-{i}") for i in range(1, 4)]
    to = [arg for _, recipient in holders for arg in ("--to", recipient)]
    out_dir = tmp_path / "handout"
    split = slurp.json(
        "keys",
        "split",
        "--threshold",
        "2",
        "--shares",
        "3",
        *to,
        "--out-dir",
        str(out_dir),
        "--forget-admin",
    )
    assert split["files"] == [str(out_dir / f"share-{i}.age") for i in (1, 2, 3)]
    slurp.error("purge", DEV, "--yes", code=FORBIDDEN, exit_code=2)
    # threshold 2: this node's own share plus holder 3's file
    share_3 = str(out_dir / "share-3.age")
    identity_3 = str(holders[2][0])
    purged = slurp.json("purge", DEV, "--yes", "--share-file", share_3, "--identity", identity_3)
    assert purged == {"purged": DEV, "versions": 1}
    assert not (slurp.data_dir / "keys" / "admin.key").exists()


def test_to_needs_one_recipient_per_share(slurp: Slurp) -> None:
    recipient = admin_recipient(slurp)
    error = slurp.error("keys", "split", "--to", recipient, code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "to"
    assert not (slurp.data_dir / "backups" / "admin-shares").exists()


# -- forgetting the admin identity ---------------------------------------------------------


def test_forget_admin_then_purge_needs_shares(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "written before the split"})])
    split = slurp.json("keys", "split", "--forget-admin")
    shares = split["shares"]
    assert split["forgot_admin"] is True
    keys = slurp.data_dir / "keys"
    assert not (keys / "admin.key").exists()
    own = keys / "admin.share.age"
    assert stat.S_IMODE(own.stat().st_mode) == 0o600
    assert own.read_bytes().startswith(AGE_HEADER)
    assert shares[0].encode() not in own.read_bytes()
    admin = role_listing(slurp, "admin")
    assert (admin["held"], admin["versions"][0]["recipient"]) == (False, split["admin_recipient"])

    # admin-only operations are refused; the other roles still read
    slurp.error("get", DEV, "--as", "admin", code=FORBIDDEN, exit_code=2)
    assert slurp.json("get", DEV)["summary"] == "written before the split"
    slurp.error("purge", DEV, "--yes", code=FORBIDDEN, exit_code=2)

    # this node's own share counts: one more share is not enough, two are
    error = slurp.error(
        "purge",
        DEV,
        "--yes",
        "--shares-stdin",
        input=lines(shares[1]),
        code=SHARES_INVALID,
        exit_code=2,
    )
    assert "need 3 shares, got 2" in error["message"]
    assert slurp.json("keys", "combine", input=lines(*shares[3:])) == {
        "recipient": split["admin_recipient"]
    }
    purged = slurp.json("purge", DEV, "--yes", "--shares-stdin", input=lines(*shares[1:3]))
    assert purged == {"purged": DEV, "versions": 1}
    assert slurp.json("stats")["purged_contexts"] == 1

    # the rebuilt identity was not written back, nor kept for the next operation
    assert not (keys / "admin.key").exists()
    assert role_listing(slurp, "admin")["held"] is False
    slurp.seed([(OBSERVER, {"summary": "after"})])
    slurp.error("purge", OBSERVER, "--yes", code=FORBIDDEN, exit_code=2)
    slurp.error("get", OBSERVER, "--as", "admin", code=FORBIDDEN, exit_code=2)

    ops = audit_ops(slurp)
    assert ("keys.split", "ok") in ops
    assert ops.count(("purge", FORBIDDEN)) == 2
    assert ops.count(("purge", "ok")) == 1
    assert ops.count(("keys.combine", "ok")) == 2
    assert ops.count(("keys.combine", "failed")) == 1


def test_forget_admin_text_output(slurp: Slurp) -> None:
    out = slurp.ok("keys", "split", "--forget-admin").stdout
    assert "keys/admin.key deleted; this node keeps share 1 (keys/admin.share.age)" in out


# -- list ----------------------------------------------------------------------------------


def test_keys_list_json(slurp: Slurp) -> None:
    listing = slurp.json("keys", "list")
    assert set(listing) == {"protected", "node_id", "node_recipient", "roles"}
    assert listing["protected"] is False
    assert listing["node_id"] == slurp.json("stats")["node_id"]
    node_identity = read_identity_file(slurp.data_dir / "keys" / "node.key")
    assert listing["node_recipient"] == str(node_identity.to_public())
    assert [role["name"] for role in listing["roles"]] == DEFAULT_ROLE_NAMES
    stats_roles = {r["name"]: r for r in slurp.json("stats")["roles"]}
    fingerprints = set()
    for role in listing["roles"]:
        assert set(role) == {"name", "authority", "current", "held", "rotation", "versions"}
        assert role["authority"] == stats_roles[role["name"]]["authority"]
        assert (role["current"], role["held"], role["rotation"]) == (1, True, None)
        (version,) = role["versions"]
        assert set(version) == {
            "version",
            "recipient",
            "fingerprint",
            "created_at",
            "retired_at",
            "current",
            "held",
        }
        assert version["version"] == 1
        assert version["recipient"] == stats_roles[role["name"]]["recipient"]
        assert re.fullmatch(r"[0-9a-f]{16}", version["fingerprint"])
        assert version["fingerprint"] == fingerprint(version["recipient"])
        assert ISO_SECONDS.match(version["created_at"])
        assert (version["retired_at"], version["current"], version["held"]) == (None, True, True)
        fingerprints.add(version["fingerprint"])
    assert len(fingerprints) == len(DEFAULT_ROLE_NAMES)


def test_keys_list_text_output(slurp: Slurp) -> None:
    out = slurp.ok("keys", "list").stdout
    for header in ("role", "authority", "version", "recipient", "fingerprint", "created"):
        assert header in out
    assert "1 (current)" in out
    for name in DEFAULT_ROLE_NAMES:
        assert name in out


# -- rotate --------------------------------------------------------------------------------


def test_rotate_json_emits_progress_then_a_report(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "dev notes"}), (OBSERVER, {"summary": "standup"})])
    before = role_listing(slurp, "backend_developer")["versions"][0]

    result = slurp.ok("keys", "rotate", "backend_developer", "--json")
    *progress, report = [json.loads(line) for line in result.stdout.splitlines()]
    assert progress
    for line in progress:
        assert set(line) == {"role", "done", "total"}
        assert line["role"] == "backend_developer"
        assert 0 <= line["done"] <= line["total"]
    assert [line["done"] for line in progress] == sorted(line["done"] for line in progress)
    assert progress[-1]["done"] == progress[-1]["total"] == 2
    assert report == {
        "role": "backend_developer",
        "from_version": 1,
        "to_version": 2,
        "scanned": 2,
        "rewritten": 2,  # the backend_developer reads both records
        "skipped": 0,
        "batches": 1,
        "resumed": False,
        "finished": True,
    }

    assert slurp.json("get", DEV, "--as", "backend_developer")["summary"] == "dev notes"
    assert slurp.json("get", OBSERVER, "--as", "backend_developer")["summary"] == "standup"
    assert slurp.json("get", OBSERVER, "--as", "observer")["summary"] == "standup"
    slurp.json("put", DEV, "--summary", "after the rotation")
    assert slurp.json("get", DEV, "--as", "backend_developer")["summary"] == "after the rotation"

    role = role_listing(slurp, "backend_developer")
    assert (role["current"], role["held"], role["rotation"]) == (2, True, None)
    v1, v2 = role["versions"]
    assert v1["recipient"] == before["recipient"]
    assert (v1["version"], v1["current"], v1["held"]) == (1, False, False)
    assert ISO_SECONDS.match(v1["retired_at"])
    assert (v2["version"], v2["current"], v2["held"], v2["retired_at"]) == (2, True, True, None)
    assert v2["recipient"] != v1["recipient"]
    assert v2["fingerprint"] != v1["fingerprint"]
    assert sorted(p.name for p in (slurp.data_dir / "keys").glob("backend_developer*")) == [
        "backend_developer.key"
    ]
    # the other roles were not touched
    assert role_listing(slurp, "observer")["current"] == 1
    assert ("keys.rotate", "ok") in audit_ops(slurp)


def test_rotate_text_output(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "dev notes"})])
    result = slurp.ok("keys", "rotate", "senior_software_architect")
    assert result.stdout == (
        "senior_software_architect: key v1 -> v2, 1 records re-encrypted, old key retired\n"
    )
    assert "rotating senior_software_architect" in result.stderr
    assert slurp.json("get", DEV, "--as", "senior_software_architect")["summary"] == "dev notes"


def test_rotate_an_unknown_role(slurp: Slurp) -> None:
    error = slurp.error("keys", "rotate", "nobody", code=INVALID_PAYLOAD, exit_code=2)
    assert "nobody" in error["message"]


def _set_max_key_age(data_dir: Path, days: int) -> None:
    config = data_dir / "config.toml"
    text = re.sub(r"(?m)^max_key_age_days = \d+", f"max_key_age_days = {days}", config.read_text())
    assert f"max_key_age_days = {days}" in text
    config.write_text(text, encoding="utf-8")


def _backdate_key(data_dir: Path, role: str, created_at: str) -> None:
    """Edit keyring.json (it stays 0600) so ``role``'s current key looks old."""
    path = data_dir / "keys" / "keyring.json"
    meta = json.loads(path.read_text(encoding="utf-8"))
    (entry,) = [r for r in meta["roles"] if r["name"] == role]
    (current,) = [v for v in entry["versions"] if v["version"] == entry["current"]]
    current["created_at"] = created_at
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_stats_warns_when_a_role_key_is_due_for_rotation(slurp: Slurp) -> None:
    stats = slurp.json("stats")
    assert (stats["warnings"], stats["audit"]) == ([], "ok")

    created = datetime.now(UTC) - timedelta(days=60, hours=1)
    _backdate_key(slurp.data_dir, "observer", created.strftime("%Y-%m-%dT%H:%M:%SZ"))
    assert slurp.json("stats")["warnings"] == []  # within the default 90 days
    _set_max_key_age(slurp.data_dir, 30)
    (warning,) = slurp.json("stats")["warnings"]
    assert "'observer' (version 1) is 60 days old" in warning
    assert "keys.max_key_age_days = 30" in warning
    assert "slurp keys rotate observer" in warning

    _set_max_key_age(slurp.data_dir, 0)  # 0: never warn
    assert slurp.json("stats")["warnings"] == []
    _set_max_key_age(slurp.data_dir, 30)
    assert len(slurp.json("stats")["warnings"]) == 1

    slurp.ok("keys", "rotate", "observer", "--json")
    assert slurp.json("stats")["warnings"] == []


def test_a_bad_max_key_age_is_refused_naming_the_key(slurp: Slurp) -> None:
    config = slurp.data_dir / "config.toml"
    config.write_text(config.read_text().replace("max_key_age_days = 90", "max_key_age_days = -1"))
    error = slurp.error("stats", code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "keys.max_key_age_days"


# -- passphrase protection (scrypt: slow) --------------------------------------------------


@pytest.mark.slow
def test_protect_then_commands_need_the_passphrase_then_unprotect(tmp_path: Path) -> None:
    """admin only, so there are few files to seal (one scrypt, ~1.5 s, per file and use)."""
    root = tmp_path / "node"
    ContextStore.init(root, parse_role_spec("admin:master"))
    address = "ucxl://claude:admin@chorus:ops/*^/runbook.md"
    plain = Slurp(root, CliRunner(env={"SLURP_PASSPHRASE": None}))
    sealed = Slurp(root, CliRunner(env={"SLURP_PASSPHRASE": "correct horse battery"}))
    plain.json("put", address, "--summary", "before protect")

    error = plain.error("keys", "protect", code=INVALID_PAYLOAD, exit_code=2)
    assert "SLURP_PASSPHRASE" in error["message"]
    assert sealed.json("keys", "protect") == {"protected": True}
    key_file = root / "keys" / "admin.key"
    assert key_file.read_text().startswith("-----BEGIN AGE ENCRYPTED FILE-----")
    assert "AGE-SECRET-KEY-" not in key_file.read_text()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    error = plain.error("get", address, code=KEYRING_UNUSABLE, exit_code=1)
    assert "SLURP_PASSPHRASE" in error["message"]
    assert sealed.json("get", address)["summary"] == "before protect"

    assert sealed.json("keys", "unprotect") == {"protected": False}
    assert "AGE-SECRET-KEY-" in key_file.read_text()
    assert plain.json("get", address)["summary"] == "before protect"
    ops = audit_ops(plain)
    assert ("keys.protect", "ok") in ops
    assert ("keys.unprotect", "ok") in ops


def test_combine_out_writes_the_identity_once_0600_and_it_opens_admin_files(
    slurp: Slurp, tmp_path: Path
) -> None:
    """``--out``: the rebuilt identity in age-keygen format, 0600, never overwritten; it is
    the admin identity (its recipient is the admin recipient on record)."""
    split = slurp.json("keys", "split", "--forget-admin")
    out = tmp_path / "admin.key"
    got = slurp.json("keys", "combine", "--out", str(out), input=lines(*split["shares"][:3]))
    assert got == {"recipient": split["admin_recipient"], "out": str(out)}
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    identity = read_identity_file(out)
    assert str(identity.to_public()) == split["admin_recipient"]
    assert audit_ops(slurp)[-2:] == [("keys.combine", "ok"), ("keys.combine.out", "ok")]
    before = out.read_bytes()
    error = slurp.error("keys", "combine", "--out", str(out), input=lines(*split["shares"][:3]),
                        code="UCXL-400-INVALID_PAYLOAD", exit_code=2)  # fmt: skip
    assert error["field"] == "out"
    assert "already exists" in error["message"]
    assert out.read_bytes() == before
