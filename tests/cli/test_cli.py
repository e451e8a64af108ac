"""The ``slurp`` command, run in-process: every command, its ``--json`` shapes, its errors.

The contract (issue "embedded store and CLI"): errors go to stderr as ``CODE: message`` and
exit 2 for bad input (4xx codes), 1 otherwise; with ``--json`` the error is also the only
thing on stdout, as ``{"error": {"code", "message", "field"}}``.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any

import plyvel
import pytest
from typer.testing import CliRunner

from crypto.roles import DEFAULT_ROLES
from storage.address import parse
from storage.context_store import ContextStore
from storage.schema import versions_prefix
from tests.cli.conftest import DAY_MS, DEV, JAN_1_2025_MS, Slurp, SteppingClock

INVALID_ADDRESS = "UCXL-400-INVALID_ADDRESS"
TEMPORAL_INVALID = "UCXL-400-TEMPORAL_INVALID"
INVALID_PAYLOAD = "UCXL-400-INVALID_PAYLOAD"
FORBIDDEN = "UCXL-403-FORBIDDEN"
NOT_FOUND = "UCXL-404-NOT_FOUND"
OUT_OF_RANGE = "UCXL-404-TEMPORAL_OUT_OF_RANGE"
VERSION_ID = re.compile(r"^[0-9a-f]{12}-[0-9a-f]{6}-[0-9a-z]+$")
DEFAULT_ROLE_NAMES = ["admin", "senior_software_architect", "backend_developer", "observer"]
AGE_HEADER = b"age-encryption.org/v1\n"

FULL_RECORD: dict[str, Any] = {
    "summary": "JWT signing moves to Ed25519",
    "purpose": "record the decision",
    "content": "def sign(claims):\n    return ed25519.sign(claims)\n",
    "tags": ["auth", "jwt"],
    "technologies": ["python", "pyjwt"],
    "insights": ["rotate keys yearly", "keep RS256 for old clients"],
    "metadata": {"ticket": "AUTH-12", "votes": 3},
    "change_reason": "first draft",
    "confidence": 0.75,
    "influences": ["ucxl://claude:backend_developer@chorus:auth/*^/docs/design.md"],
}


def at(address: str, temporal: str) -> str:
    """``address`` with its ``*^`` temporal segment replaced by ``temporal``."""
    return address.replace("/*^", f"/{temporal}", 1)


def contexts_of(items: list[dict[str, Any]]) -> set[str]:
    """The ``context`` of every item of an ``ls`` or ``search`` answer."""
    return {item["context"] for item in items}


# -- init ----------------------------------------------------------------------------------


def test_init_creates_a_node_with_the_default_roles(tmp_path: Path) -> None:
    root = tmp_path / "fresh"
    slurp = Slurp(root, CliRunner())
    assert slurp.json("init") == {"data_dir": str(root), "roles": DEFAULT_ROLE_NAMES}
    for name in DEFAULT_ROLE_NAMES:
        assert stat.S_IMODE((root / "keys" / f"{name}.key").stat().st_mode) == 0o600
    roles = [(r["name"], r["authority"], r["held"]) for r in slurp.json("stats")["roles"]]
    assert roles == [
        ("admin", "master", True),
        ("senior_software_architect", "decision", True),
        ("backend_developer", "suggestion", True),
        ("observer", "read_only", True),
    ]


def test_init_text_output_names_the_roles(tmp_path: Path) -> None:
    result = Slurp(tmp_path / "fresh", CliRunner()).ok("init")
    assert "admin, senior_software_architect, backend_developer, observer" in result.stdout


def test_init_refuses_a_directory_that_already_holds_a_node(slurp: Slurp) -> None:
    result = slurp.run("init", "--json")
    assert isinstance(result.exception, SystemExit)
    assert result.exit_code != 0
    error = json.loads(result.stdout)["error"]
    assert error["field"] == "data_dir"
    assert "already holds a slurp node" in error["message"]
    assert result.stderr.startswith(f"{error['code']}: ")


def test_init_with_custom_roles(tmp_path: Path) -> None:
    root = tmp_path / "custom"
    slurp = Slurp(root, CliRunner())
    assert slurp.json("init", "--roles", "architect:decision,dev")["roles"] == [
        "admin",
        "architect",
        "dev",
    ]
    roles = {r["name"]: r["authority"] for r in slurp.json("stats")["roles"]}
    assert roles == {"admin": "master", "architect": "decision", "dev": "suggestion"}
    assert sorted(p.name for p in (root / "keys").glob("*.key")) == [
        "admin.key",
        "architect.key",
        "dev.key",
        "node.key",
    ]

    address = "ucxl://claude:dev@chorus:auth/*^/notes.md"
    slurp.json("put", address, "--summary", "custom roles work")
    view = slurp.json("get", address)
    assert set(view["roles"]) == {"dev", "architect", "admin"}
    assert slurp.json("get", address, "--as", "architect")["summary"] == "custom roles work"

    error = slurp.error(
        "put",
        "ucxl://claude:backend_developer@chorus:auth/*^",
        "--summary",
        "x",
        code=INVALID_PAYLOAD,
        exit_code=2,
    )
    assert error["field"] == "roles"
    assert "'backend_developer'" in error["message"]


@pytest.mark.parametrize(
    "spec",
    ["bad name", "dev:superuser", "dev,dev", "admin:decision"],
    ids=["bad-name", "bad-authority", "repeated", "admin-not-master"],
)
def test_init_rejects_a_bad_role_spec(tmp_path: Path, spec: str) -> None:
    root = tmp_path / "custom"
    error = Slurp(root, CliRunner()).error(
        "init", "--roles", spec, code=INVALID_PAYLOAD, exit_code=2
    )
    assert error["field"] == "roles"
    assert not root.exists()


# -- put and get -----------------------------------------------------------------------------


def test_put_prints_the_new_version_and_get_prints_the_record(slurp: Slurp, tmp_path: Path) -> None:
    record_file = tmp_path / "record.json"
    record_file.write_text(json.dumps(FULL_RECORD), encoding="utf-8")

    first = slurp.json("put", DEV, "--file", str(record_file))
    assert set(first) == {"address", "version", "version_id"}
    assert first["address"] == at(DEV, "*~1")
    assert first["version"] == 1
    assert VERSION_ID.match(first["version_id"])

    second = slurp.json("put", DEV, "--summary", "second")
    assert second["address"] == at(DEV, "*~2")
    assert second["version"] == 2
    assert second["version_id"] > first["version_id"]

    view = slurp.json("get", at(DEV, "*~1"))
    assert view["address"] == at(DEV, "*~1")
    assert view["version"] == 1
    assert view["version_id"] == first["version_id"]
    assert view["context"] == DEV
    assert view["parent_version"] is None
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", view["created_at"])
    assert view["created_by"].startswith("claude/backend_developer@")
    assert view["read_as"] in view["roles"]
    assert view["expires_at"] is None
    for name, value in FULL_RECORD.items():
        assert view[name] == value, name

    latest = slurp.json("get", DEV)
    assert (latest["version"], latest["summary"]) == (2, "second")
    assert latest["parent_version"] == first["version_id"]


def test_get_text_output(slurp: Slurp) -> None:
    slurp.seed([(DEV, FULL_RECORD)])
    out = slurp.ok("get", DEV).stdout
    assert at(DEV, "*~1") in out
    assert FULL_RECORD["summary"] in out
    assert "rotate keys yearly" in out
    assert FULL_RECORD["content"] in out


def test_put_text_output(slurp: Slurp) -> None:
    out = slurp.ok("put", DEV, "--summary", "s").stdout
    assert out.startswith(f"stored {at(DEV, '*~1')} (")


def test_put_reads_the_record_from_stdin(slurp: Slurp) -> None:
    record = {"summary": "from stdin", "tags": ["piped"], "metadata": {"k": [1, 2]}}
    ref = slurp.json("put", DEV, "--file", "-", "--tag", "extra", input=json.dumps(record))
    view = slurp.json("get", ref["address"])
    assert view["summary"] == "from stdin"
    assert view["tags"] == ["piped", "extra"]
    assert view["metadata"] == {"k": [1, 2]}


def test_put_flags_override_the_file(slurp: Slurp) -> None:
    record = {"summary": "from the file", "technologies": ["go"]}
    slurp.json(
        "put",
        DEV,
        "-f",
        "-",
        "--summary",
        "from a flag",
        "--tech",
        "rust",
        input=json.dumps(record),
    )
    view = slurp.json("get", DEV)
    assert view["summary"] == "from a flag"
    assert view["technologies"] == ["go", "rust"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"summary": 5}, "summary"),
        ({"tags": "auth"}, "tags"),
        ({"tags": [1]}, "tags"),
        ({"tags": ["two\nlines"]}, "tags"),
        ({"content": 12}, "content"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"confidence": "high"}, "confidence"),
        ({"confidence": 1.5}, "confidence"),
        ({"ttl": 1.5}, "ttl"),
        ({"influences": ["not an address"]}, "influences"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_put_rejects_a_bad_field_naming_it(
    slurp: Slurp, fields: dict[str, Any], field: str
) -> None:
    error = slurp.error(
        "put", DEV, "--file", "-", input=json.dumps(fields), code=INVALID_PAYLOAD, exit_code=2
    )
    assert error["field"] == field
    assert field in error["message"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"a string"'])
def test_put_rejects_a_file_that_is_not_a_json_object(slurp: Slurp, text: str) -> None:
    error = slurp.error("put", DEV, "--file", "-", input=text, code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "file"
    slurp.error("history", DEV, code=NOT_FOUND, exit_code=2)  # nothing was stored


@pytest.mark.parametrize(
    ("address", "field"),
    [
        ("ucxl://any:backend_developer@chorus:auth/*^/x", "address"),
        ("ucxl://claude:backend_developer@*:auth/*^/x", "address"),
        ("ucxl://claude:backend_developer@chorus:auth/*~1/x", "temporal"),
        ("ucxl://claude:backend_developer@chorus:auth/~~1/x", "temporal"),
    ],
)
def test_put_needs_a_concrete_latest_address(slurp: Slurp, address: str, field: str) -> None:
    error = slurp.error("put", address, "--summary", "x", code=INVALID_ADDRESS, exit_code=2)
    assert error["field"] == field


def test_put_to_an_unknown_role_needs_explicit_readers(slurp: Slurp) -> None:
    address = "ucxl://claude:nobody@chorus:auth/*^/x"
    error = slurp.error("put", address, "--summary", "x", code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "roles"
    assert "'nobody'" in error["message"]
    assert "--role" in error["message"]

    slurp.json("put", address, "--summary", "x", "--role", "observer")
    assert set(slurp.json("get", address)["roles"]) == {"observer", "admin"}

    error = slurp.error(
        "put", DEV, "--summary", "x", "--role", "nobody", code=INVALID_PAYLOAD, exit_code=2
    )
    assert "'nobody'" in error["message"]


# -- who may read ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "readers"),
    [
        ("observer", set(DEFAULT_ROLE_NAMES)),
        ("backend_developer", {"backend_developer", "senior_software_architect", "admin"}),
        ("senior_software_architect", {"senior_software_architect", "admin"}),
        ("admin", {"admin"}),
    ],
)
def test_default_readers_are_the_role_every_higher_authority_and_admin(
    slurp: Slurp, role: str, readers: set[str]
) -> None:
    address = f"ucxl://claude:{role}@chorus:auth/*^/x"
    slurp.seed([(address, {"summary": "secret"})])
    view = slurp.json("get", address)
    assert set(view["roles"]) == readers
    assert view["read_as"] in readers
    for name in DEFAULT_ROLE_NAMES:
        if name in readers:
            read = slurp.json("get", address, "--as", name)
            assert (read["read_as"], read["summary"]) == (name, "secret")
        else:
            error = slurp.error("get", address, "--as", name, code=FORBIDDEN, exit_code=2)
            assert error["field"] == "role"
            assert "secret" not in error["message"]


def test_explicit_readers_replace_the_defaults(slurp: Slurp) -> None:
    slurp.json("put", DEV, "--summary", "not for observers")
    slurp.error("get", DEV, "--as", "observer", code=FORBIDDEN, exit_code=2)

    slurp.json("put", DEV, "--summary", "for observers", "--role", "observer")
    view = slurp.json("get", DEV, "--as", "observer")
    assert (view["summary"], view["read_as"]) == ("for observers", "observer")
    assert set(view["roles"]) == {"observer", "admin"}
    assert slurp.json("get", DEV, "--as", "admin")["summary"] == "for observers"
    for outsider in ("backend_developer", "senior_software_architect"):
        slurp.error("get", DEV, "--as", outsider, code=FORBIDDEN, exit_code=2)
    # the first version still has the default readers
    slurp.error("get", at(DEV, "*~1"), "--as", "observer", code=FORBIDDEN, exit_code=2)


def test_reading_as_an_unknown_role_is_forbidden(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "s"})])
    error = slurp.error("get", DEV, "--as", "nobody", code=FORBIDDEN, exit_code=2)
    assert error["field"] == "role"


# -- temporal navigation and wildcards ---------------------------------------------------------


def test_get_navigates_versions(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": f"v{n}"}) for n in (1, 2, 3)])
    expected = {
        "*~1": 1,
        "*~": 1,
        "*~2": 2,
        "*~3": 3,
        "~~1": 2,
        "~~": 2,
        "~~0": 3,
        "~~2": 1,
        "^^1": 2,
        "^^": 2,
        "^^0": 1,
        "^^2": 3,
        "*^": 3,
        "9999-12-31T23:59:59Z": 3,
    }
    got = {}
    for temporal in expected:
        view = slurp.json("get", at(DEV, temporal))
        assert view["address"] == at(DEV, f"*~{view['version']}")
        assert view["summary"] == f"v{view['version']}"
        got[temporal] = view["version"]
    assert got == expected


def test_get_outside_the_history_is_out_of_range(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": f"v{n}"}) for n in (1, 2, 3)])
    for temporal in ("*~4", "~~3", "^^3", "2000-01-01T00:00:00Z", "1970-01-01T00:00:00Z"):
        error = slurp.error("get", at(DEV, temporal), code=OUT_OF_RANGE, exit_code=2)
        assert error["field"] == "temporal", temporal


def test_get_at_an_instant_picks_the_latest_version_created_by_then(slurp: Slurp) -> None:
    # versions created at 2025-01-01, -02 and -03, midnight UTC
    slurp.seed([(DEV, {"summary": f"v{n}"}) for n in (1, 2, 3)], clock=SteppingClock())
    expected = {
        "2025-01-01T00:00:00Z": 1,  # at exactly its creation
        "2025-01-01T23:59:59Z": 1,
        "2025-01-02T00:00:00Z": 2,
        "2025-01-02T01:00:00+01:00": 2,  # = 2025-01-02T00:00:00Z
        "2025-01-02T12:00:00": 2,  # no offset: UTC
        "2025-01-03T00:00:00Z": 3,
        "9999-12-31T23:59:59Z": 3,
    }
    got = {t: slurp.json("get", at(DEV, t))["version"] for t in expected}
    assert got == expected
    for temporal in ("2024-12-31T23:59:59Z", "1970-01-01T00:00:00Z"):
        slurp.error("get", at(DEV, temporal), code=OUT_OF_RANGE, exit_code=2)


def test_wildcard_get_reads_the_most_recently_updated_match(slurp: Slurp) -> None:
    alice = "ucxl://alice:backend_developer@chorus:auth/*^/notes.md"
    bob = "ucxl://bob:backend_developer@chorus:auth/*^/notes.md"
    carol = "ucxl://carol:backend_developer@chorus:billing/*^/notes.md"
    slurp.seed(
        [
            (alice, {"summary": "alice 1"}),
            (bob, {"summary": "bob 1"}),
            (alice, {"summary": "alice 2"}),  # alice is now the latest-updated in auth
            (carol, {"summary": "carol 1"}),
        ],
        clock=SteppingClock(),
    )
    any_agent = "ucxl://any:backend_developer@chorus:auth/*^/notes.md"
    view = slurp.json("get", any_agent)
    assert (view["address"], view["summary"]) == (at(alice, "*~2"), "alice 2")
    assert slurp.json("get", any_agent.replace("any:", "*:"))["summary"] == "alice 2"
    assert slurp.json("get", at(any_agent, "*~1"))["summary"] == "alice 1"
    assert slurp.json("get", "ucxl://any:any@chorus:any/*^/notes.md")["summary"] == "carol 1"
    slurp.error("get", "ucxl://any:any@chorus:any/*^/other.md", code=NOT_FOUND, exit_code=2)

    slurp.json("delete", alice)  # a deleted context is no longer a match
    assert slurp.json("get", any_agent)["summary"] == "bob 1"


# -- ls, history, search ---------------------------------------------------------------------


def test_ls_lists_the_contexts_a_pattern_matches(slurp: Slurp) -> None:
    a = "ucxl://alice:backend_developer@chorus:auth/*^/docs/a.md"
    b = "ucxl://alice:backend_developer@chorus:auth/*^/docs/b.md"
    c = "ucxl://alice:backend_developer@chorus:auth/*^/docsx/c.md"
    d = "ucxl://bob:observer@chorus:planning/*^/docs/a.md"
    e = "ucxl://bob:observer@bzzz:planning/*^"
    slurp.seed([(x, {"summary": "s"}) for x in (a, b, b, c, d, e)])
    cases = {
        "ucxl://any:any@any:any/*^": {a, b, c, d, e},
        "ucxl://*:*@chorus:*/*^": {a, b, c, d},
        "ucxl://alice:any@chorus:auth/*^/docs": {a, b},
        "ucxl://any:any@any:any/*^/docs/a.md": {a, d},
        "ucxl://any:observer@any:planning/*^": {d, e},
        "ucxl://nobody:any@any:any/*^": set(),
    }
    got = {pattern: contexts_of(slurp.json("ls", pattern)) for pattern in cases}
    assert got == cases

    listing = {item["context"]: item for item in slurp.json("ls", "ucxl://any:any@any:any/*^")}
    assert set(listing[b]) == {
        "context",
        "address",
        "versions",
        "version_id",
        "updated_at",
        "deleted",
    }
    assert (listing[b]["address"], listing[b]["versions"]) == (at(b, "*~2"), 2)
    assert listing[b]["deleted"] is False
    assert VERSION_ID.match(listing[b]["version_id"])

    out = slurp.ok("ls", "ucxl://alice:any@chorus:auth/*^/docs").stdout
    assert at(a, "*~1") in out
    assert at(b, "*~2") in out
    assert "docsx" not in out


def test_history_lists_every_version_oldest_first(slurp: Slurp) -> None:
    refs = slurp.seed([(DEV, {"summary": f"v{n}", "tags": [f"t{n}"]}) for n in (1, 2, 3)])
    entries = slurp.json("history", at(DEV, "*~2"))  # any temporal names the same context
    assert [e["version"] for e in entries] == [1, 2, 3]
    assert [e["address"] for e in entries] == [at(DEV, f"*~{n}") for n in (1, 2, 3)]
    assert [e["version_id"] for e in entries] == [ref.version_id for ref in refs]
    assert [e["parent_version"] for e in entries] == [None, refs[0].version_id, refs[1].version_id]
    assert [e["kind"] for e in entries] == ["put", "put", "put"]
    assert [e["tags"] for e in entries] == [["t1"], ["t2"], ["t3"]]
    assert set(entries[0]) == {
        "address",
        "version",
        "version_id",
        "parent_version",
        "kind",
        "created_at",
        "created_by",
        "roles",
        "tags",
        "siblings",
    }
    assert all(e["siblings"] == 0 for e in entries)

    out = slurp.ok("history", DEV).stdout
    assert all(ref.version_id in out for ref in refs)


def test_search_filters_and_reader_roles(slurp: Slurp) -> None:
    a = "ucxl://alice:backend_developer@chorus:auth/*^/jwt.md"
    b = "ucxl://bob:backend_developer@chorus:billing/*^/invoice.md"
    c = "ucxl://carol:observer@bzzz:auth/*^/notes.md"
    d = "ucxl://dave:senior_software_architect@chorus:auth/*^/adr.md"
    slurp.seed(
        [
            (a, {"summary": "token rotation policy", "tags": ["security", "auth"]}),
            (b, {"summary": "invoice token format", "tags": ["billing"]}),
            (c, {"summary": "token notes for everyone", "tags": ["security"]}),
            (d, {"summary": "unrelated design decision", "tags": ["security"]}),
        ]
    )

    def hits(*args: str) -> set[str]:
        return contexts_of(slurp.json("search", *args))

    assert hits("token") == {a, b, c}
    assert hits("token", "--project", "chorus") == {a, b}
    assert hits("token", "--task", "auth") == {a, c}
    assert hits("token", "--project", "chorus", "--task", "auth") == {a}
    assert hits("token", "--tag", "security") == {a, c}
    assert hits("token", "--tag", "security", "--tag", "auth") == {a}
    assert hits("", "--tag", "billing") == {b}
    assert hits("rotation policy") == {a}
    assert hits("nothing-matches-this") == set()
    assert len(slurp.json("search", "token", "--limit", "1")) == 1

    assert hits("token", "--as", "observer") == {c}
    assert hits("token", "--as", "backend_developer") == {a, b, c}
    assert hits("design", "--as", "backend_developer") == set()
    assert hits("design", "--as", "senior_software_architect") == {d}
    assert hits("design", "--as", "admin") == {d}

    (hit,) = slurp.json("search", "rotation")
    assert set(hit) == {"address", "context", "version", "version_id", "score"}
    assert (hit["address"], hit["context"], hit["version"]) == (at(a, "*~1"), a, 1)
    assert VERSION_ID.match(hit["version_id"])
    assert isinstance(hit["score"], float)
    assert at(a, "*~1") in slurp.ok("search", "rotation").stdout

    slurp.error("search", "token", "--as", "nobody", code=FORBIDDEN, exit_code=2)
    error = slurp.error("search", "token", "--limit", "0", code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "limit"


# -- delete and purge ------------------------------------------------------------------------


def test_delete_leaves_a_tombstone_in_the_history(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "v1"}), (DEV, {"summary": "v2 searchable"})])
    ref = slurp.json("delete", DEV)
    assert set(ref) == {"address", "version", "version_id"}
    assert (ref["address"], ref["version"]) == (at(DEV, "*~3"), 3)

    error = slurp.error("get", DEV, code=NOT_FOUND, exit_code=2)
    assert "deleted" in error["message"]
    entries = slurp.json("history", DEV)
    assert [e["kind"] for e in entries] == ["put", "put", "tombstone"]
    assert entries[2]["version_id"] == ref["version_id"]
    assert entries[2]["parent_version"] == entries[1]["version_id"]
    assert slurp.json("get", at(DEV, "*~1"))["summary"] == "v1"  # the history stays readable
    slurp.error("get", at(DEV, "*~3"), code=NOT_FOUND, exit_code=2)  # the delete marker
    slurp.error("delete", DEV, code=NOT_FOUND, exit_code=2)

    pattern = "ucxl://any:any@any:any/*^"
    assert slurp.json("ls", pattern) == []
    (listed,) = slurp.json("ls", pattern, "--deleted")
    assert (listed["context"], listed["deleted"], listed["versions"]) == (DEV, True, 3)
    assert slurp.json("search", "searchable") == []

    again = slurp.json("put", DEV, "--summary", "v4")
    assert again["version"] == 4
    assert slurp.json("get", DEV)["summary"] == "v4"


def test_delete_text_output(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "v1"})])
    assert slurp.ok("delete", DEV).stdout == f"deleted {at(DEV, '*~2')}\n"


def test_purge_needs_yes_then_destroys_every_version(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "v1"}), (DEV, {"summary": "v2"})])

    error = slurp.error("purge", DEV, code=INVALID_PAYLOAD, exit_code=2)
    assert error["field"] == "yes"
    assert "--yes" in error["message"]
    assert slurp.json("get", DEV)["summary"] == "v2"  # nothing happened

    assert slurp.json("purge", DEV, "--yes") == {"purged": DEV, "versions": 2}
    for address in (DEV, at(DEV, "*~1")):
        slurp.error("get", address, code=NOT_FOUND, exit_code=2)
    slurp.error("history", DEV, code=NOT_FOUND, exit_code=2)
    slurp.error("purge", DEV, "--yes", code=NOT_FOUND, exit_code=2)
    stats = slurp.json("stats")
    assert (stats["contexts"], stats["versions"], stats["purged_contexts"]) == (0, 0, 1)

    assert slurp.json("put", DEV, "--summary", "reborn")["version"] == 1
    assert [e["kind"] for e in slurp.json("history", DEV)] == ["put"]


def test_purge_without_yes_in_text_mode(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "v1"})])
    result = slurp.run("purge", DEV)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.startswith(f"{INVALID_PAYLOAD}: ")
    assert slurp.ok("purge", DEV, "--yes").stdout == "purged 1 versions\n"


def test_purge_needs_a_concrete_address(slurp: Slurp) -> None:
    error = slurp.error(
        "purge", "ucxl://any:any@chorus:auth/*^", "--yes", code=INVALID_ADDRESS, exit_code=2
    )
    assert error["field"] == "address"


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "code", "field"),
    [
        ("http://claude:dev@chorus:auth/*^", INVALID_ADDRESS, "scheme"),
        ("ucxl://cla ude:dev@chorus:auth/*^", INVALID_ADDRESS, "agent"),
        ("ucxl://claude:de!v@chorus:auth/*^", INVALID_ADDRESS, "role"),
        ("ucxl://claude:dev@cho rus:auth/*^", INVALID_ADDRESS, "project"),
        ("ucxl://claude:dev@chorus:au%20th/*^", INVALID_ADDRESS, "task"),
        ("ucxl://claude:dev@chorus:auth", INVALID_ADDRESS, "temporal"),
        ("ucxl://claude:dev@chorus:auth/*^/src/../etc", INVALID_ADDRESS, "path"),
        ("ucxl://claude:dev@chorus:auth/*^/src#frag", INVALID_ADDRESS, "path"),
        ("ucxl://claude:dev@chorus:auth/~~x", TEMPORAL_INVALID, "temporal"),
        ("ucxl://claude:dev@chorus:auth/*~0", TEMPORAL_INVALID, "temporal"),
        ("ucxl://claude:dev@chorus:auth/2025-13-01T00:00:00Z", TEMPORAL_INVALID, "temporal"),
    ],
)
def test_a_malformed_address_names_its_field(
    slurp: Slurp, address: str, code: str, field: str
) -> None:
    error = slurp.error("address", "parse", address, code=code, exit_code=2)
    assert error["field"] == field
    assert field in error["message"]


@pytest.mark.parametrize(
    "command",
    [
        ["get"],
        ["put", "--summary", "x"],
        ["history"],
        ["ls"],
        ["delete"],
        ["purge", "--yes"],
        ["get", "--encrypted"],
    ],
    ids=lambda command: "-".join(command),
)
def test_every_command_reports_a_malformed_address(slurp: Slurp, command: list[str]) -> None:
    name, *options = command
    bad = "ucxl://cla ude:backend_developer@chorus:auth/*^"
    error = slurp.error(name, bad, *options, code=INVALID_ADDRESS, exit_code=2)
    assert error["field"] == "agent"


def test_an_error_without_json_goes_to_stderr_only(slurp: Slurp) -> None:
    result = slurp.run("get", DEV)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert re.fullmatch(rf"{NOT_FOUND}: [^\n]+\n", result.stderr)


def test_a_store_fault_exits_1(slurp: Slurp) -> None:
    """A corrupt record is not the caller's fault: exit 1, code UCXL-500-CORRUPT_RECORD."""
    slurp.seed([(DEV, {"summary": "will be damaged"})])
    db = plyvel.DB(str(slurp.data_dir / "db"))
    try:
        ((key, value),) = db.iterator(prefix=versions_prefix(parse(DEV).context().key()))
        damaged = bytearray(value)
        damaged[len(damaged) // 2] ^= 0xFF
        db.put(key, bytes(damaged), sync=True)
    finally:
        db.close()
    error = slurp.error("get", DEV, code="UCXL-500-CORRUPT_RECORD", exit_code=1)
    assert "will be damaged" not in error["message"]


def test_a_missing_node_is_not_found(tmp_path: Path) -> None:
    slurp = Slurp(tmp_path / "nothing-here", CliRunner())
    error = slurp.error("get", DEV, code=NOT_FOUND, exit_code=2)
    assert error["field"] == "data_dir"
    assert "slurp init" in error["message"]
    assert not (tmp_path / "nothing-here").exists()


def test_a_data_dir_held_open_is_in_use(slurp: Slurp) -> None:
    with ContextStore.open(slurp.data_dir):
        error = slurp.error("get", DEV, code="UCXL-409-DATA_DIR_IN_USE", exit_code=1)
    assert error["field"] == "data_dir"
    slurp.error("get", DEV, code=NOT_FOUND, exit_code=2)  # released


# -- address parse, stats, index, compact, encrypted export ----------------------------------


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (
            "ucxl://gpt4:architect@bzzz:v2-migration/*^/decisions/protocol-choice.json",
            ("gpt4", "architect", "bzzz", "v2-migration", "decisions/protocol-choice.json"),
        ),
        (
            "ucxl://any:any@chorus:planning/*~/planning/requirements.md",
            ("any", "any", "chorus", "planning", "planning/requirements.md"),
        ),
        (
            "ucxl://claude:reviewer@bzzz:auth-system/2025-08-07T14:30:00Z/code-review.json",
            ("claude", "reviewer", "bzzz", "auth-system", "code-review.json"),
        ),
        (
            "ucxl://claude:developer@chorus:auth/~~2/src/auth/jwt.py",
            ("claude", "developer", "chorus", "auth", "src/auth/jwt.py"),
        ),
        ("ucxl://claude:developer@chorus:auth/*~3", ("claude", "developer", "chorus", "auth", "")),
    ],
)
def test_address_parse_json(
    slurp: Slurp, address: str, expected: tuple[str, str, str, str, str]
) -> None:
    parsed = slurp.json("address", "parse", address)
    assert set(parsed) == {"agent", "role", "project", "task", "path", "canonical", "temporal"}
    assert (
        parsed["agent"],
        parsed["role"],
        parsed["project"],
        parsed["task"],
        parsed["path"],
    ) == expected
    assert parsed["canonical"] == address


@pytest.mark.parametrize(
    ("temporal", "kind", "value", "canonical"),
    [
        ("*^", "latest", None, "*^"),
        ("*~", "first", None, "*~"),
        ("*~3", "version", 3, "*~3"),
        ("~~", "back", 1, "~~1"),
        ("~~2", "back", 2, "~~2"),
        ("^^", "forward", 1, "^^1"),
        ("^^4", "forward", 4, "^^4"),
        ("2025-08-07T14:30:00Z", "instant", "2025-08-07T14:30:00Z", "2025-08-07T14:30:00Z"),
        ("2025-08-07T16:30:00+02:00", "instant", "2025-08-07T14:30:00Z", "2025-08-07T14:30:00Z"),
        ("2025-08-07T14:30:00", "instant", "2025-08-07T14:30:00Z", "2025-08-07T14:30:00Z"),
    ],
)
def test_address_parse_temporal(
    slurp: Slurp, temporal: str, kind: str, value: object, canonical: str
) -> None:
    parsed = slurp.json("address", "parse", f"ucxl://a:r@p:t/{temporal}/x")
    assert parsed["temporal"] == {"kind": kind, "value": value}
    assert parsed["canonical"] == f"ucxl://a:r@p:t/{canonical}/x"


def test_address_parse_normalises(slurp: Slurp) -> None:
    parsed = slurp.json("address", "parse", "UCXL://*:developer@chorus:auth/*^/a//b/")
    assert parsed["agent"] == "any"
    assert parsed["path"] == "a/b"
    assert parsed["canonical"] == "ucxl://any:developer@chorus:auth/*^/a/b"
    out = slurp.ok("address", "parse", "UCXL://*:developer@chorus:auth/*^/a//b/").stdout
    assert "canonical: ucxl://any:developer@chorus:auth/*^/a/b" in out


def test_stats_json(slurp: Slurp) -> None:
    other = "ucxl://claude:observer@chorus:auth/*^/gone.md"
    slurp.seed([(DEV, {"summary": "v1"}), (DEV, {"summary": "v2"}), (other, {"summary": "x"})])
    slurp.json("delete", other)
    stats = slurp.json("stats")
    assert set(stats) == {
        "data_dir",
        "node_id",
        "contexts",
        "deleted_contexts",
        "versions",
        "purged_contexts",
        "db_bytes",
        "group_commit",
        "cache",
        "index",
        "roles",
        "audit",
        "warnings",
    }
    assert stats["audit"] == "ok"
    assert stats["warnings"] == []
    assert stats["data_dir"] == str(slurp.data_dir)
    assert re.fullmatch(r"[0-9a-f]{16}", stats["node_id"])
    assert (stats["contexts"], stats["deleted_contexts"], stats["versions"]) == (2, 1, 4)
    assert stats["purged_contexts"] == 0
    assert stats["db_bytes"] > 0
    assert set(stats["group_commit"]) == {"writes", "syncs", "largest_group"}
    assert {"hits", "misses", "entries", "bytes", "max_bytes"} <= set(stats["cache"])
    assert stats["index"]["backend"] == "tantivy"
    assert stats["index"]["documents"] == 1
    assert [r["name"] for r in stats["roles"]] == DEFAULT_ROLE_NAMES
    for role in stats["roles"]:
        assert set(role) == {"name", "authority", "recipient", "held"}
        assert role["recipient"].startswith("age1")
    assert len({r["recipient"] for r in stats["roles"]}) == len(DEFAULT_ROLES)

    out = slurp.ok("stats").stdout
    assert "contexts: 2" in out
    assert "versions: 4" in out


def test_index_rebuild(slurp: Slurp) -> None:
    a = "ucxl://alice:backend_developer@chorus:auth/*^/a.md"
    b = "ucxl://bob:backend_developer@chorus:auth/*^/b.md"
    c = "ucxl://carol:backend_developer@chorus:auth/*^/c.md"
    slurp.seed([(x, {"summary": "rebuildable words"}) for x in (a, b, c)])
    slurp.json("delete", c)
    assert slurp.json("index", "rebuild") == {"indexed": 2}
    assert contexts_of(slurp.json("search", "rebuildable")) == {a, b}
    assert slurp.ok("index", "rebuild").stdout == "indexed 2 contexts\n"
    assert slurp.json("stats")["index"]["documents"] == 2


def test_compact_keeps_the_data(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": f"v{n}"}) for n in (1, 2)])
    assert slurp.json("compact") == {"compacted": True}
    assert slurp.json("get", at(DEV, "*~1"))["summary"] == "v1"
    assert slurp.json("get", DEV)["summary"] == "v2"


def test_get_encrypted_exports_the_stored_ciphertext(slurp: Slurp, tmp_path: Path) -> None:
    refs = slurp.seed([(DEV, {"summary": "v1"}), (DEV, {"summary": "v2"})])
    target = tmp_path / "v1.age"
    out = slurp.json("get", at(DEV, "*~"), "--encrypted", "-o", str(target))
    assert out == {
        "address": at(DEV, "*~1"),
        "version": 1,
        "version_id": refs[0].version_id,
        "file": str(target),
        "bytes": target.stat().st_size,
    }
    assert target.read_bytes().startswith(AGE_HEADER)

    raw = slurp.ok("get", DEV, "--encrypted").stdout_bytes
    assert raw.startswith(AGE_HEADER)
    assert raw != target.read_bytes()

    slurp.json("delete", DEV)
    slurp.error("get", at(DEV, "*~3"), "--encrypted", code=NOT_FOUND, exit_code=2)


def test_times_are_utc_iso_with_milliseconds(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "v1"})], clock=SteppingClock(JAN_1_2025_MS + DAY_MS + 5))
    assert slurp.json("get", DEV)["created_at"] == "2025-01-02T00:00:00.005Z"
    assert slurp.json("history", DEV)[0]["created_at"] == "2025-01-02T00:00:00.005Z"
