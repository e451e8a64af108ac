"""Tests of storage.address against shared/UCXL.md: one test (or table row) per rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.address import (
    LATEST,
    MAX_ADDRESS_LEN,
    WILDCARD,
    Address,
    ContextName,
    Temporal,
    parse,
    parse_instant,
    parse_temporal,
)
from storage.errors import AddressError, InvalidAddress, TemporalInvalid
from tests import strategies as sts

BASE = "ucxl://claude:developer@chorus:auth"


def cn(project: str = "chorus", task: str = "auth", agent: str = "claude", role: str = "dev",
       path: str = "") -> ContextName:  # fmt: skip
    return ContextName(project=project, task=task, agent=agent, role=role, path=path)


# --- the examples of UCXL.md -------------------------------------------------------------

EXAMPLES = [
    ("ucxl://gpt4:architect@bzzz:v2-migration/*^/decisions/protocol-choice.json",
     ("gpt4", "architect", "bzzz", "v2-migration", "decisions/protocol-choice.json"),
     Temporal("latest", None)),
    ("ucxl://any:any@chorus:planning/*~/planning/requirements.md",
     ("any", "any", "chorus", "planning", "planning/requirements.md"),
     Temporal("first", None)),
    ("ucxl://claude:reviewer@bzzz:auth-system/2025-08-07T14:30:00Z/code-review.json",
     ("claude", "reviewer", "bzzz", "auth-system", "code-review.json"),
     Temporal("instant", datetime(2025, 8, 7, 14, 30, tzinfo=UTC))),
    ("ucxl://claude:developer@chorus:auth/~~2/src/auth/jwt.py",
     ("claude", "developer", "chorus", "auth", "src/auth/jwt.py"),
     Temporal("back", 2)),
    ("ucxl://claude:developer@chorus:auth/*~3",
     ("claude", "developer", "chorus", "auth", ""),
     Temporal("version", 3)),
]  # fmt: skip


@pytest.mark.parametrize(("text", "parts", "temporal"), EXAMPLES)
def test_ucxl_md_examples_parse(
    text: str, parts: tuple[str, str, str, str, str], temporal: Temporal
) -> None:
    address = parse(text)
    assert (address.agent, address.role, address.project, address.task, address.path) == parts
    assert address.temporal == temporal
    assert address.canonical() == text
    assert str(address) == text


# --- bad inputs: code and field ------------------------------------------------------------

BAD = [
    # scheme
    ("", InvalidAddress, "scheme"),
    ("claude:dev@chorus:auth/*^", InvalidAddress, "scheme"),
    ("http://claude:dev@chorus:auth/*^", InvalidAddress, "scheme"),
    ("ucxl:/claude:dev@chorus:auth/*^", InvalidAddress, "scheme"),
    (" ucxl://claude:dev@chorus:auth/*^", InvalidAddress, "scheme"),
    ("ucx1://claude:dev@chorus:auth/*^", InvalidAddress, "scheme"),
    # agent
    ("ucxl://:dev@chorus:auth/*^", InvalidAddress, "agent"),
    ("ucxl://cla ude:dev@chorus:auth/*^", InvalidAddress, "agent"),
    ("ucxl://cla%20ude:dev@chorus:auth/*^", InvalidAddress, "agent"),
    ("ucxl://clé:dev@chorus:auth/*^", InvalidAddress, "agent"),
    ("ucxl://**:dev@chorus:auth/*^", InvalidAddress, "agent"),
    ("ucxl://a.b:dev@chorus:auth/*^", InvalidAddress, "agent"),
    ("ucxl://a\x00b:dev@chorus:auth/*^", InvalidAddress, "agent"),
    # role
    ("ucxl://claude@chorus:auth/*^", InvalidAddress, "role"),
    ("ucxl://claude:@chorus:auth/*^", InvalidAddress, "role"),
    ("ucxl://claude:dev:x@chorus:auth/*^", InvalidAddress, "role"),
    ("ucxl://claude:de\tv@chorus:auth/*^", InvalidAddress, "role"),
    # project
    ("ucxl://claude:dev/*^", InvalidAddress, "project"),
    ("ucxl://claude:dev@:auth/*^", InvalidAddress, "project"),
    ("ucxl://claude:dev@cho@rus:auth/*^", InvalidAddress, "project"),
    ("ucxl://claude:dev@chorus#x:auth/*^", InvalidAddress, "project"),
    # task
    ("ucxl://claude:dev@chorus/*^", InvalidAddress, "task"),
    ("ucxl://claude:dev@chorus:/*^", InvalidAddress, "task"),
    ("ucxl://claude:dev@chorus:auth?x=1/*^", InvalidAddress, "task"),
    ("ucxl://claude:dev@chorus:au:th/*^", InvalidAddress, "task"),
    ("ucxl://claude:dev@chorus:auth\n/*^", InvalidAddress, "task"),
    # temporal missing (address-level) / malformed (TEMPORAL_INVALID)
    ("ucxl://claude:dev@chorus:auth", InvalidAddress, "temporal"),
    ("ucxl://claude:dev@chorus:auth/", InvalidAddress, "temporal"),
    ("ucxl://claude:dev@chorus:auth//*^/src", InvalidAddress, "temporal"),
    ("ucxl://claude:dev@chorus:auth/src/a.py", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/*", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/^", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/*^3", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/*~0", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/*~-1", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/~~x", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/~~1000000001", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/*^?q=1", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/2025-13-01T00:00:00Z", TemporalInvalid, "temporal"),
    ("ucxl://claude:dev@chorus:auth/2025-08-07", TemporalInvalid, "temporal"),
    # path
    ("ucxl://claude:dev@chorus:auth/*^/src/../etc", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/./src", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/..", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/a b", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/a%2Fb", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/a?b=1", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/a#frag", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/a\x7f", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/a\\b", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/a@b", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/*~3", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/2025-08-07T14:30:00Z", InvalidAddress, "path"),
    ("ucxl://claude:dev@chorus:auth/*^/src\n", InvalidAddress, "path"),
    # length
    ("ucxl://claude:dev@chorus:auth/*^/" + "a" * MAX_ADDRESS_LEN, InvalidAddress, "address"),
]


@pytest.mark.parametrize(("text", "error", "field"), BAD)
def test_bad_inputs_raise_code_and_field(text: str, error: type[AddressError], field: str) -> None:
    with pytest.raises(AddressError) as info:
        parse(text)
    assert type(info.value) is error
    assert info.value.field == field
    assert field in info.value.message
    assert info.value.input == text[:MAX_ADDRESS_LEN]
    assert info.value.code == error.code
    assert info.value.to_dict()["field"] == field


def test_error_codes_are_the_ucxl_ones() -> None:
    assert InvalidAddress.code == "UCXL-400-INVALID_ADDRESS"
    assert TemporalInvalid.code == "UCXL-400-TEMPORAL_INVALID"


@pytest.mark.parametrize(
    ("char", "hint"),
    [(" ", "space"), ("%", "percent"), ("?", "quer"), ("#", "fragment"), ("\x01", "control")],
)
def test_forbidden_characters_are_explained(char: str, hint: str) -> None:
    with pytest.raises(InvalidAddress, match=hint):
        parse(f"ucxl://claude:dev@chorus:auth/*^/a{char}b")


# --- temporal forms -------------------------------------------------------------------------

TEMPORALS = [
    ("*^", "latest", None, "*^"),
    ("*~", "first", None, "*~"),
    ("*~1", "version", 1, "*~1"),
    ("*~3", "version", 3, "*~3"),
    ("*~007", "version", 7, "*~7"),
    ("*~1000000000", "version", 10**9, "*~1000000000"),
    ("~~", "back", 1, "~~1"),
    ("~~0", "back", 0, "~~0"),
    ("~~2", "back", 2, "~~2"),
    ("^^", "forward", 1, "^^1"),
    ("^^0", "forward", 0, "^^0"),
    ("^^5", "forward", 5, "^^5"),
]


@pytest.mark.parametrize(("segment", "kind", "value", "rendered"), TEMPORALS)
def test_temporal_forms(segment: str, kind: str, value: int | None, rendered: str) -> None:
    temporal = parse_temporal(segment)
    assert (temporal.kind, temporal.value) == (kind, value)
    assert temporal.render() == rendered
    assert temporal.to_json() == {"kind": kind, "value": value}
    assert parse(f"{BASE}/{segment}/x").temporal == temporal


@pytest.mark.parametrize(
    "segment",
    ["", "*", "^", "~", "*^^", "*~0", "*~00", "~~-1", "^^+1", "*~ 3", "*~3.0", "*~\u0663",
     "~~1000000001", "~~" + "9" * 5000, "latest", "*~3x", "^^^", "~~~", "2025"],
)  # fmt: skip
def test_bad_temporal_segments(segment: str) -> None:
    with pytest.raises(TemporalInvalid) as info:
        parse_temporal(segment)
    assert info.value.field == "temporal"
    assert "temporal" in info.value.message
    assert info.value.input == segment[:MAX_ADDRESS_LEN]


def test_version_zero_message_says_versions_are_one_based() -> None:
    with pytest.raises(TemporalInvalid, match="start at 1"):
        parse(f"{BASE}/*~0")


# --- instants -------------------------------------------------------------------------------

INSTANTS = [
    ("2025-08-07T14:30:00Z", datetime(2025, 8, 7, 14, 30, tzinfo=UTC), "2025-08-07T14:30:00Z"),
    ("2025-08-07T14:30:00", datetime(2025, 8, 7, 14, 30, tzinfo=UTC), "2025-08-07T14:30:00Z"),
    ("2025-08-07T14:30:00+02:00", datetime(2025, 8, 7, 12, 30, tzinfo=UTC),
     "2025-08-07T12:30:00Z"),
    ("2025-08-07T23:30:00-01:30", datetime(2025, 8, 8, 1, 0, tzinfo=UTC),
     "2025-08-08T01:00:00Z"),
    ("2025-08-07T14:30:00-00:00", datetime(2025, 8, 7, 14, 30, tzinfo=UTC),
     "2025-08-07T14:30:00Z"),
    ("2025-08-07T14:30:00.5Z", datetime(2025, 8, 7, 14, 30, 0, 500000, tzinfo=UTC),
     "2025-08-07T14:30:00.500000Z"),
    ("2025-08-07T14:30:00.000000Z", datetime(2025, 8, 7, 14, 30, tzinfo=UTC),
     "2025-08-07T14:30:00Z"),
    ("2025-08-07T14:30:00.123456789Z", datetime(2025, 8, 7, 14, 30, 0, 123456, tzinfo=UTC),
     "2025-08-07T14:30:00.123456Z"),
    ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00Z"),
    ("0099-02-03T04:05:06Z", datetime(99, 2, 3, 4, 5, 6, tzinfo=UTC), "0099-02-03T04:05:06Z"),
    ("2024-02-29T23:59:59Z", datetime(2024, 2, 29, 23, 59, 59, tzinfo=UTC),
     "2024-02-29T23:59:59Z"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected", "rendered"), INSTANTS)
def test_instants(text: str, expected: datetime, rendered: str) -> None:
    value = parse_instant(text)
    assert value == expected
    assert value.utcoffset() == timedelta(0)
    temporal = parse_temporal(text)
    assert temporal == Temporal("instant", expected)
    assert temporal.render() == rendered
    assert temporal.to_json() == {"kind": "instant", "value": rendered}
    assert parse(f"{BASE}/{text}/a").temporal == temporal


@pytest.mark.parametrize(
    "text",
    [
        "2025-08-07",  # no time
        "2025-08-07 14:30:00Z",  # space, not T
        "2025-08-07t14:30:00Z",  # lower-case t
        "2025-08-07T14:30:00z",  # lower-case z
        "2025-08-07T14:30Z",  # no seconds
        "2025-8-7T14:30:00Z",  # unpadded
        "20250807T143000Z",  # basic format
        "2025-08-07T14:30:00.Z",  # empty fraction
        "2025-08-07T14:30:00.1234567890Z",  # more than 9 fraction digits
        "2025-08-07T14:30:00+0200",  # offset without colon
        "2025-08-07T14:30:00+02",  # offset without minutes
        "2025-08-07T14:30:00+24:00",  # offset out of range
        "2025-08-07T14:30:00+05:60",
        "2025-02-30T00:00:00Z",  # no such day
        "2025-08-07T24:00:00Z",
        "2025-08-07T14:60:00Z",
        "2025-08-07T14:30:60Z",  # leap seconds are not representable
        "0000-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
        "2025-08-07T14:30:00ZZ",
        "\u0662025-08-07T14:30:00Z",  # non-ASCII digit
        "2025-08-07T14:30:00Z\n",
    ],
)
def test_bad_instants(text: str) -> None:
    with pytest.raises(TemporalInvalid) as info:
        parse_instant(text)
    assert info.value.field == "temporal"
    assert "temporal" in info.value.message
    with pytest.raises(TemporalInvalid):
        parse(f"{BASE}/{text}")


# --- Temporal construction ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("latest", 1),
        ("first", 0),
        ("version", 0),
        ("version", None),
        ("version", 10**9 + 1),
        ("version", True),
        ("back", -1),
        ("forward", 1.5),
        ("instant", datetime(2025, 1, 1)),  # naive
        ("instant", 5),
        ("newest", None),
    ],
)
def test_temporal_constructor_rejects_values_that_do_not_fit(kind: str, value: object) -> None:
    with pytest.raises(TemporalInvalid):
        Temporal(kind, value)  # type: ignore[arg-type]


def test_temporal_instant_is_stored_in_utc() -> None:
    plus_two = timezone(timedelta(hours=2))
    temporal = Temporal("instant", datetime(2025, 8, 7, 16, 30, tzinfo=plus_two))
    assert isinstance(temporal.value, datetime)
    assert temporal.value.tzinfo is UTC
    assert temporal.render() == "2025-08-07T14:30:00Z"
    assert temporal == Temporal("instant", datetime(2025, 8, 7, 14, 30, tzinfo=UTC))


def test_latest_constant() -> None:
    assert Temporal("latest", None) == LATEST
    assert LATEST.render() == "*^"
    assert LATEST.to_json() == {"kind": "latest", "value": None}


# --- normalisation, case, wildcards ---------------------------------------------------------

NORMALISED = [
    ("ucxl://a:b@c:d/*^", ""),
    ("ucxl://a:b@c:d/*^/", ""),
    ("ucxl://a:b@c:d/*^//", ""),
    ("ucxl://a:b@c:d/*^/x", "x"),
    ("ucxl://a:b@c:d/*^//x", "x"),
    ("ucxl://a:b@c:d/*^/x/", "x"),
    ("ucxl://a:b@c:d/*^/x//y///z//", "x/y/z"),
    ("ucxl://a:b@c:d/*^/.hidden/...", ".hidden/..."),
    ("ucxl://a:b@c:d/*^/a.b/c..d/-_", "a.b/c..d/-_"),
    ("ucxl://a:b@c:d/*^/2025-08-07", "2025-08-07"),  # looks like a date, is a path
]


@pytest.mark.parametrize(("text", "path"), NORMALISED)
def test_path_normalisation(text: str, path: str) -> None:
    address = parse(text)
    assert address.path == path
    assert address.temporal == LATEST
    assert address.canonical() == "ucxl://a:b@c:d/*^" + (f"/{path}" if path else "")


def test_temporal_is_always_the_first_segment_after_task() -> None:
    assert parse("ucxl://a:b@c:d/~~2/x").path == "x"
    assert parse("ucxl://a:b@c:d/*~3/src").temporal == Temporal("version", 3)
    with pytest.raises(TemporalInvalid):
        parse("ucxl://a:b@c:d/src/*^")


@pytest.mark.parametrize("scheme", ["UCXL://", "Ucxl://", "ucXL://"])
def test_scheme_is_case_insensitive_and_written_lower_case(scheme: str) -> None:
    address = parse(f"{scheme}a:b@c:d/*^")
    assert address.canonical().startswith("ucxl://")


def test_scheme_lookalikes_are_rejected() -> None:
    with pytest.raises(InvalidAddress) as info:
        parse("ucxＬ://a:b@c:d/*^")  # fullwidth L
    assert info.value.field == "scheme"


def test_component_case_is_kept_and_matters() -> None:
    upper = parse("ucxl://Claude:Dev@Chorus:AUTH/*^/Src")
    lower = parse("ucxl://claude:dev@chorus:auth/*^/src")
    assert (upper.agent, upper.role, upper.project, upper.task, upper.path) == (
        "Claude", "Dev", "Chorus", "AUTH", "Src",
    )  # fmt: skip
    assert upper != lower
    assert not cn(agent="Claude").matches(cn(agent="claude"))


def test_star_is_read_as_any_and_written_any() -> None:
    address = parse("ucxl://*:*@*:*/*^/x")
    assert (address.agent, address.role, address.project, address.task) == (WILDCARD,) * 4
    assert address.canonical() == "ucxl://any:any@any:any/*^/x"
    assert address.has_wildcard
    assert address.context().has_wildcard


def test_wildcard_is_lower_case_any_only() -> None:
    assert not parse("ucxl://ANY:Any@chorus:auth/*^").has_wildcard
    assert parse("ucxl://claude:dev@chorus:any/*^").has_wildcard
    assert not parse("ucxl://claude:dev@chorus:auth/*^/any").has_wildcard


# --- length ---------------------------------------------------------------------------------


def test_length_limit_is_2048_characters() -> None:
    head = "ucxl://a:b@c:d/*^/"
    exact = head + "p" * (MAX_ADDRESS_LEN - len(head))
    assert len(parse(exact).canonical()) == MAX_ADDRESS_LEN
    with pytest.raises(InvalidAddress) as info:
        parse(exact + "p")
    assert info.value.field == "address"
    assert info.value.input == exact


def test_length_limit_applies_to_the_canonical_form() -> None:
    head = "ucxl://*:b@c:d/*^/"  # "*" grows to "any" in canonical form
    text = head + "p" * (MAX_ADDRESS_LEN - len(head))
    with pytest.raises(InvalidAddress) as info:
        parse(text)
    assert (info.value.field, info.value.input) == ("address", text)


def test_length_limit_on_construction() -> None:
    with pytest.raises(InvalidAddress) as info:
        cn(path="p" * MAX_ADDRESS_LEN)
    assert info.value.field == "address"


# --- constructors only accept canonical values ----------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("agent", ""), ("agent", "*"), ("role", "a b"), ("project", "a\x00b"), ("task", "é"),
     ("path", "/a"), ("path", "a/"), ("path", "a//b"), ("path", "a/../b"), ("path", "."),
     ("path", "a b")],
)  # fmt: skip
def test_constructors_reject_non_canonical_values(field: str, value: str) -> None:
    parts = {"agent": "claude", "role": "dev", "project": "chorus", "task": "auth", "path": "x"}
    parts[field] = value
    with pytest.raises(InvalidAddress) as info:
        ContextName(**parts)
    assert info.value.field == field
    with pytest.raises(InvalidAddress):
        Address(temporal=LATEST, **parts)


def test_address_needs_a_temporal() -> None:
    with pytest.raises(TemporalInvalid):
        Address("a", "b", "c", "d", "", "*^")  # type: ignore[arg-type]


# --- Address and ContextName behaviour ------------------------------------------------------


def test_context_and_back() -> None:
    address = parse("ucxl://claude:dev@chorus:auth/~~2/src/a.py")
    name = address.context()
    assert name == cn(path="src/a.py")
    assert name.canonical() == "ucxl://claude:dev@chorus:auth/*^/src/a.py"
    assert name.address() == address.with_temporal(LATEST)
    assert name.address(Temporal("back", 2)) == address
    assert address.with_temporal(Temporal("version", 4)).canonical().endswith("/*~4/src/a.py")


def test_to_json() -> None:
    address = parse("ucxl://claude:dev@chorus:auth/2025-08-07T14:30:00+02:00/src")
    assert address.to_json() == {
        "agent": "claude",
        "role": "dev",
        "project": "chorus",
        "task": "auth",
        "path": "src",
        "canonical": "ucxl://claude:dev@chorus:auth/2025-08-07T12:30:00Z/src",
        "temporal": {"kind": "instant", "value": "2025-08-07T12:30:00Z"},
    }


def test_addresses_are_hashable_values() -> None:
    a, b = parse(f"{BASE}/*^/x"), parse(f"{BASE}/*^//x/")
    assert a == b
    assert len({a, b, a.context()}) == 2


MATCHES = [
    # (pattern, concrete, path_prefix, expected)
    (cn(), cn(), False, True),
    (cn(agent="any"), cn(agent="gpt4"), False, True),
    (cn(project="any", task="any", agent="any", role="any"), cn(), False, True),
    (cn(agent="gpt4"), cn(agent="claude"), False, False),
    (cn(role="any"), cn(role="dev", task="other"), False, False),
    (cn(project="Chorus"), cn(), False, False),
    (cn(path="src"), cn(path="src"), False, True),
    (cn(path="src"), cn(path="src/a.py"), False, False),
    (cn(path=""), cn(path="src"), False, False),
    (cn(path=""), cn(path=""), False, True),
    (cn(path="src"), cn(path="src"), True, True),
    (cn(path="src"), cn(path="src/a.py"), True, True),
    (cn(path="src"), cn(path="src/x/y/z"), True, True),
    (cn(path="src"), cn(path="srcx"), True, False),
    (cn(path="src"), cn(path="srcx/a.py"), True, False),
    (cn(path="src/a"), cn(path="src"), True, False),
    (cn(path=""), cn(path="anything/at/all"), True, True),
    (cn(path=""), cn(path=""), True, True),
    (cn(agent="any", path="src"), cn(agent="x", path="src/a"), True, True),
    (cn(agent="any", path="src"), cn(agent="x", path="lib/a"), True, False),
]


@pytest.mark.parametrize(("pattern", "concrete", "path_prefix", "expected"), MATCHES)
def test_matches(
    pattern: ContextName, concrete: ContextName, path_prefix: bool, expected: bool
) -> None:
    assert pattern.matches(concrete, path_prefix=path_prefix) is expected


# --- keys -----------------------------------------------------------------------------------


def test_key_layout() -> None:
    assert cn(path="src/a.py").key() == b"chorus\x00auth\x00claude\x00dev\x00src/a.py"
    assert cn().key() == b"chorus\x00auth\x00claude\x00dev\x00"


@pytest.mark.parametrize(
    "key",
    [b"", b"chorus", b"chorus\x00auth\x00claude\x00dev", b"a\x00b\x00c\x00d\x00e\x00f",
     b"a\x00\x00c\x00d\x00e", b"a\x00b\x00c\x00d\x00/e", b"a\x00b\x00c\x00d\x00e/",
     b"a\x00b\x00c\x00d\x00..", b"a\x00b\x00c\xff\x00d\x00e", b"a b\x00b\x00c\x00d\x00e",
     b"\xc3\xa9\x00b\x00c\x00d\x00e"],
)  # fmt: skip
def test_from_key_rejects_malformed_keys(key: bytes) -> None:
    with pytest.raises(InvalidAddress) as info:
        ContextName.from_key(key)
    assert info.value.field in {"address", "project", "task", "agent", "role", "path"}
    assert info.value.input is not None


KEY_PREFIXES = [
    (cn(path="src"), b"chorus\x00auth\x00claude\x00dev\x00src"),
    (cn(), b"chorus\x00auth\x00claude\x00dev\x00"),
    (cn(role="any"), b"chorus\x00auth\x00claude\x00"),
    (cn(agent="any"), b"chorus\x00auth\x00"),
    (cn(agent="any", role="any"), b"chorus\x00auth\x00"),
    (cn(task="any", agent="gpt4"), b"chorus\x00"),
    (cn(project="any"), b""),
    (cn(project="any", task="any", agent="any", role="any"), b""),
]


@pytest.mark.parametrize(("pattern", "prefix"), KEY_PREFIXES)
def test_key_prefix(pattern: ContextName, prefix: bytes) -> None:
    assert pattern.key_prefix() == prefix


# --- properties -----------------------------------------------------------------------------


@given(sts.addresses(wildcards=True))
def test_canonical_round_trip(address: Address) -> None:
    """parse(a.canonical()) == a, and parsing a canonical string gives it back unchanged."""
    text = address.canonical()
    assert parse(text) == address
    assert parse(text).canonical() == text
    assert len(text) <= MAX_ADDRESS_LEN


@given(sts.address_spellings())
def test_spellings_parse_to_their_canonical_address(spelling: tuple[str, Address]) -> None:
    """Every accepted non-canonical spelling parses to the address it spells."""
    text, address = spelling
    assert parse(text) == address


@given(sts.temporals())
def test_temporal_round_trip(temporal: Temporal) -> None:
    """parse_temporal(t.render()) == t for every Temporal."""
    assert parse_temporal(temporal.render()) == temporal


@given(st.text(max_size=80))
def test_parse_arbitrary_text_raises_only_address_errors(text: str) -> None:
    """parse(any text) returns an Address or raises an AddressError naming a field."""
    _parse_or_address_error(text)


ADDRESSY = st.text(alphabet="ucxlUCXL:/@*^~any0123456789-TZ.+_ ?#%\x00é", max_size=60)


@given(st.sampled_from(["ucxl://", "UCXL://", "ucxl://a:b@c:d/", "ucxl://*:*@*:*/"]), ADDRESSY)
def test_parse_address_like_text_raises_only_address_errors(head: str, tail: str) -> None:
    """parse(scheme + noise) returns an Address or raises an AddressError naming a field."""
    _parse_or_address_error(head + tail)


def _parse_or_address_error(text: str) -> None:
    error: AddressError | None = None
    try:
        address = parse(text)
    except AddressError as exc:
        error = exc
    if error is None:
        assert parse(address.canonical()) == address
        return
    assert error.field in {"scheme", "agent", "role", "project", "task", "temporal", "path",
                           "address"}  # fmt: skip
    assert error.field in error.message
    assert error.input == text[:MAX_ADDRESS_LEN]


@given(sts.context_names(wildcards=True))
def test_key_round_trip(name: ContextName) -> None:
    """ContextName.from_key(n.key()) == n."""
    assert ContextName.from_key(name.key()) == name


@given(sts.context_names(wildcards=True), sts.context_names(wildcards=True))
def test_key_is_injective_and_ordered_like_the_name(a: ContextName, b: ContextName) -> None:
    """a.key() == b.key() iff a == b, and keys sort like ContextNames."""
    assert (a.key() == b.key()) == (a == b)
    assert (a.key() < b.key()) == (a < b)


@given(sts.context_names(wildcards=True), sts.context_names(), st.booleans())
def test_match_implies_key_prefix(pattern: ContextName, concrete: ContextName, pp: bool) -> None:
    """pattern.matches(c) implies c.key().startswith(pattern.key_prefix())."""
    if pattern.matches(concrete, path_prefix=pp):
        assert concrete.key().startswith(pattern.key_prefix())


@given(sts.context_names().flatmap(lambda c: st.tuples(st.just(c), sts.patterns_matching(c))))
def test_derived_patterns_match_within_their_key_prefix(
    case: tuple[ContextName, tuple[ContextName, bool]],
) -> None:
    """A pattern derived from c (components to any, path cut) matches c inside its key prefix."""
    concrete, (pattern, path_prefix) = case
    assert pattern.matches(concrete, path_prefix=path_prefix)
    assert concrete.key().startswith(pattern.key_prefix())


@given(sts.context_names(wildcards=True))
def test_from_canonical_round_trip(name: ContextName) -> None:
    """ContextName.from_canonical(n.canonical()) == n."""
    assert ContextName.from_canonical(name.canonical()) == name


@pytest.mark.parametrize(
    "text",
    ["ucxl://a:b@c:d/~~1/x", "UCXL://a:b@c:d/*^/x", "ucxl://*:b@c:d/*^", "ucxl://a:b@c:d/*^/x/",
     "ucxl://a:b@c:d"],
)  # fmt: skip
def test_from_canonical_is_strict(text: str) -> None:
    with pytest.raises(InvalidAddress):
        ContextName.from_canonical(text)


@given(sts.context_names())
def test_concrete_name_is_its_own_exact_pattern(name: ContextName) -> None:
    """A concrete name matches itself exactly, and its key prefix is its whole key."""
    assert name.matches(name)
    assert not name.has_wildcard
    assert name.key_prefix() == name.key()


def test_derived_values_are_kept_and_equal_to_fresh_ones() -> None:
    """context(), canonical(), key() and from_canonical() give the same values, computed once."""
    addr = parse("ucxl://claude:backend_developer@chorus:auth/*^/src/a.py")
    ctx = addr.context()
    assert addr.context() is ctx
    fresh = ContextName(ctx.project, ctx.task, ctx.agent, ctx.role, ctx.path)
    assert ctx == fresh
    assert hash(ctx) == hash(fresh)
    assert ctx.canonical() == fresh.canonical()
    assert ctx.key() == fresh.key()
    assert ContextName.from_canonical(ctx.canonical()) == ctx
    assert ContextName.from_canonical(ctx.canonical()) is ContextName.from_canonical(
        ctx.canonical()
    )
    with pytest.raises(AddressError):  # a failed parse is not kept: it raises every time
        ContextName.from_canonical("ucxl://claude:backend_developer@chorus:auth/~~1/a")
    with pytest.raises(AddressError):
        ContextName.from_canonical("ucxl://claude:backend_developer@chorus:auth/~~1/a")


def test_parse_keeps_what_it_parsed_and_never_a_failure() -> None:
    """parse returns the kept instance for a text it parsed, equal to a fresh parse; a text
    that fails raises every time, with the same field."""
    text = "UCXL://claude:backend_developer@chorus:auth/*^//src//b.py"
    first = parse(text)
    assert parse(text) is first
    assert first == parse(first.canonical())
    assert first.canonical() == "ucxl://claude:backend_developer@chorus:auth/*^/src/b.py"
    bad = "ucxl://claude:backend developer@chorus:auth/*^/a"
    for _ in range(2):
        with pytest.raises(InvalidAddress) as caught:
            parse(bad)
        assert caught.value.field == "role"


@given(sts.addresses())
def test_context_address_equals_a_checked_address(addr: Address) -> None:
    """ContextName.address (which skips re-checking the name) equals the Address that the
    checking constructor builds, and keeps its context."""
    ctx = addr.context()
    rebuilt = ctx.address(addr.temporal)
    assert rebuilt == Address(addr.agent, addr.role, addr.project, addr.task, addr.path,
                              addr.temporal)  # fmt: skip
    assert rebuilt.canonical() == addr.canonical()
    assert rebuilt.context() is ctx


def test_context_address_still_checks_the_length_and_the_temporal() -> None:
    head = "ucxl://a:b@c:d/*^/"
    ctx = parse(head + "p" * (MAX_ADDRESS_LEN - len(head))).context()
    assert len(ctx.address().canonical()) == MAX_ADDRESS_LEN
    with pytest.raises(InvalidAddress) as info:
        ctx.address(Temporal("version", 10))  # "*~10" is two characters longer than "*^"
    assert info.value.field == "address"
    with pytest.raises(TemporalInvalid):
        ctx.address("*^")  # type: ignore[arg-type]
