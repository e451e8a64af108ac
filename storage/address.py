"""UCXL addresses: parsing, canonical rendering, context names and wildcard matching.

Owns: the address grammar of shared/UCXL.md (``ucxl://AGENT:ROLE@PROJECT:TASK/TEMPORAL[/PATH]``),
the ``Temporal`` selector, the ``ContextName`` an address names without its temporal segment,
and the LevelDB key layout of a context name (``project\\0task\\0agent\\0role\\0path``).
Must not know about records, stores, roles' permissions or the network: it only reads text.

Invariants:
    - Every ``Address`` / ``ContextName`` / ``Temporal`` instance is canonical: constructors
      validate (they raise ``InvalidAddress`` / ``TemporalInvalid``; they never normalise), so
      ``parse(a.canonical()) == a`` for every instance ``a``. Only ``parse`` normalises
      (scheme case, ``*`` -> ``any``, path slashes, temporal spelling, instant offsets).
    - Components hold ``[A-Za-z0-9_-]+``; the wildcard is exactly ``any`` (case-sensitive).
    - Paths hold ``[A-Za-z0-9_./-]*`` with no empty, ``.`` or ``..`` segments.
    - Instants are timezone-aware and stored in UTC.
    - A canonical string is at most ``MAX_ADDRESS_LEN`` characters.
    - ``ContextName.key()`` is injective (no component contains NUL) and sorts like the
      ``ContextName`` itself, since NUL sorts before every allowed character.
    - Parsing raises only ``AddressError`` subclasses, each naming its field.
    - Instances are immutable, so derived values are computed once and kept: an
      ``Address`` keeps its ``context()`` and ``canonical()``, a ``ContextName`` its
      ``canonical()`` and ``key()``, and ``ContextName.from_canonical`` keeps the last
      ``CANONICAL_CACHE_SIZE`` names it parsed (the write path meets the same context
      string several times per version: service, version store, replica), and ``parse``
      the last ``PARSED_CACHE_SIZE`` addresses (a hot read parses nothing). ``parse`` and
      ``Address.context()`` build their instances from components already checked, so
      they check only the canonical length again.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal, TypeVar, get_args

from storage.errors import InvalidAddress, TemporalInvalid

MAX_ADDRESS_LEN = 2048
WILDCARD = "any"
SCHEME = "ucxl://"
MAX_TEMPORAL_NUMBER = 10**9
CANONICAL_CACHE_SIZE = 4096  # context strings kept parsed by ContextName.from_canonical
PARSED_CACHE_SIZE = 4096  # address strings kept parsed by parse (a hot read parses none)

TemporalKind = Literal["latest", "first", "version", "back", "forward", "instant"]
_KINDS: frozenset[str] = frozenset(get_args(TemporalKind))

# Counted temporal forms; "*~" alone (the first version) is matched before these.
_COUNTED: tuple[tuple[str, TemporalKind], ...] = (
    ("*~", "version"),
    ("~~", "back"),
    ("^^", "forward"),
)
_COMPONENT_CHARS = frozenset(string.ascii_letters + string.digits + "_-")
_PATH_CHARS = _COMPONENT_CHARS | {"/", "."}
_COMPONENT_RE = re.compile(r"[A-Za-z0-9_-]+")  # fast paths; the sets above explain failures
_PATH_RE = re.compile(r"[A-Za-z0-9_./-]*")
_DIGITS = re.compile(r"[0-9]+")
_INSTANT = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"T(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
    r"(?:\.(?P<fraction>[0-9]{1,9}))?"
    r"(?P<offset>Z|[+-][0-9]{2}:[0-9]{2})?"
)


@dataclass(frozen=True)
class Temporal:
    """Which version of a context an address selects (the TEMPORAL segment).

    Attributes:
        kind: ``latest`` (``*^``), ``first`` (``*~``), ``version`` (``*~N``, 1-based),
            ``back`` (``~~N``, N before the latest), ``forward`` (``^^N``, N after the first)
            or ``instant`` (the latest version created at or before an ISO-8601 instant).
        value: None for latest/first; an int in 1..10**9 for version; an int in 0..10**9
            for back/forward; a timezone-aware datetime for instant (stored in UTC).

    Raises:
        TemporalInvalid: if ``value`` does not fit ``kind``.
    """

    kind: TemporalKind
    value: int | datetime | None = None

    def __post_init__(self) -> None:
        kind, value = self.kind, self.value
        if kind not in _KINDS:
            raise _temporal_error(f"temporal kind {kind!r} is unknown", str(kind))
        if kind in ("latest", "first"):
            if value is not None:
                raise _temporal_error(f"temporal {kind} takes no value", repr(value))
        elif kind == "instant":
            if not isinstance(value, datetime) or value.utcoffset() is None:
                raise _temporal_error("temporal instant needs a timezone-aware datetime", "")
            object.__setattr__(self, "value", _to_utc(value, repr(value)))
        else:
            lowest = 1 if kind == "version" else 0
            if not isinstance(value, int) or isinstance(value, bool):
                raise _temporal_error(f"temporal {kind} needs an integer", repr(value))
            if not lowest <= value <= MAX_TEMPORAL_NUMBER:
                raise _temporal_error(
                    f"temporal {kind} must be in {lowest}..{MAX_TEMPORAL_NUMBER}", str(value)
                )

    def render(self) -> str:
        """The canonical segment, e.g. ``*^``, ``*~3``, ``~~2``, ``2025-08-07T14:30:00Z``."""
        kind, value = self.kind, self.value
        if kind == "latest":
            return "*^"
        if kind == "first":
            return "*~"
        if isinstance(value, datetime):
            return _render_instant(value)
        prefix = {"version": "*~", "back": "~~", "forward": "^^"}[kind]
        return f"{prefix}{value}"

    def to_json(self) -> dict[str, Any]:
        """``{"kind": ..., "value": ...}``; an instant's value is its canonical ISO string."""
        value = _render_instant(self.value) if isinstance(self.value, datetime) else self.value
        return {"kind": self.kind, "value": value}


LATEST = Temporal("latest", None)


@dataclass(frozen=True, order=True)
class ContextName:
    """An address without its temporal segment: it names one context (or, with ``any``, a pattern).

    Field order is the sort order and the key order: project, task, agent, role, path.

    Raises:
        InvalidAddress: if a component or the path is not canonical, or if the canonical
            string (with ``*^``) would exceed ``MAX_ADDRESS_LEN``.
    """

    project: str
    task: str
    agent: str
    role: str
    path: str

    def __post_init__(self) -> None:
        _check_name(self.agent, self.role, self.project, self.task, self.path)
        canonical = self.canonical()
        _check_length(canonical, canonical)

    def key(self) -> bytes:
        """The LevelDB key ``project\\0task\\0agent\\0role\\0path`` (UTF-8); injective."""
        found: bytes | None = self.__dict__.get("_key")
        if found is None:
            parts = (self.project, self.task, self.agent, self.role, self.path)
            found = "\x00".join(parts).encode()
            object.__setattr__(self, "_key", found)  # derived, immutable: kept (see Invariants)
        return found

    @classmethod
    def from_key(cls, key: bytes) -> ContextName:
        """The inverse of ``key()``.

        Args:
            key: bytes produced by ``key()``.

        Returns:
            The context name whose key is ``key``.

        Raises:
            InvalidAddress: if ``key`` is not the key of a valid context name.
        """
        shown = key.decode("ascii", "backslashreplace")[:MAX_ADDRESS_LEN]
        try:
            parts = key.decode("ascii").split("\x00")
        except UnicodeDecodeError:
            raise _invalid("address", "address key is not ASCII", shown) from None
        if len(parts) != 5:
            raise _invalid(
                "address", f"address key has {len(parts)} NUL-separated parts, not 5", shown
            )
        project, task, agent, role, path = parts
        try:
            return cls(project=project, task=task, agent=agent, role=role, path=path)
        except InvalidAddress as exc:
            exc.input = shown
            raise

    @classmethod
    def from_canonical(cls, text: str) -> ContextName:
        """The inverse of ``canonical()``: strict, for context strings the store wrote itself.

        Args:
            text: a string equal to some ``ContextName.canonical()`` (temporal ``*^``).

        Returns:
            The context name it names.

        Raises:
            AddressError: ``text`` does not parse, or is not exactly a canonical context
                string (``field="address"``).
        """
        if isinstance(text, str):
            return _context_from_canonical(text)
        return _parse_canonical_context(text)

    def address(self, temporal: Temporal = LATEST) -> Address:
        """This context at ``temporal``.

        Raises:
            InvalidAddress: if the canonical string would exceed ``MAX_ADDRESS_LEN``.
        """
        if not isinstance(temporal, Temporal):
            raise _temporal_error("temporal must be a Temporal", repr(temporal))
        # This name's components passed ``_check_name`` when it was built (instances are
        # canonical): only the length, which depends on ``temporal``, is checked again.
        addr: Address = object.__new__(Address)
        for field, value in (
            ("agent", self.agent), ("role", self.role), ("project", self.project),
            ("task", self.task), ("path", self.path), ("temporal", temporal),
            ("_context", self),
        ):  # fmt: skip
            object.__setattr__(addr, field, value)
        canonical = addr.canonical()
        _check_length(canonical, canonical)
        return addr

    def canonical(self) -> str:
        """The canonical string of ``self.address(LATEST)``."""
        found: str | None = self.__dict__.get("_canonical")
        if found is None:
            found = _render(self.agent, self.role, self.project, self.task, "*^", self.path)
            object.__setattr__(self, "_canonical", found)
        return found

    @property
    def has_wildcard(self) -> bool:
        """True if any of agent/role/project/task is ``any``."""
        return WILDCARD in (self.agent, self.role, self.project, self.task)

    def matches(self, concrete: ContextName, *, path_prefix: bool = False) -> bool:
        """Whether this pattern matches ``concrete``.

        Each of agent/role/project/task matches if the pattern's value is ``any`` or equal
        (case-sensitive). The path must be equal, unless ``path_prefix``: then the pattern
        path matches itself and everything under it on segment boundaries (``src`` matches
        ``src`` and ``src/a.py``, not ``srcx``), and an empty pattern path matches every path.

        Args:
            concrete: the context to test (its ``any`` values are taken literally).
            path_prefix: match the path as a segment prefix instead of exactly.

        Returns:
            True on a match.
        """
        for pattern, value in (
            (self.project, concrete.project),
            (self.task, concrete.task),
            (self.agent, concrete.agent),
            (self.role, concrete.role),
        ):
            if pattern != WILDCARD and pattern != value:
                return False
        if not path_prefix:
            return self.path == concrete.path
        if not self.path:
            return True
        return concrete.path == self.path or concrete.path.startswith(self.path + "/")

    def key_prefix(self) -> bytes:
        """The longest key prefix shared by every context this pattern matches.

        Concrete components are taken in key order up to the first ``any``; when all four
        are concrete the path follows (valid for both exact and ``path_prefix`` matching).
        E.g. ``b"chorus\\0auth\\0"`` when project and task are concrete and agent is ``any``.
        """
        prefix = ""
        for value in (self.project, self.task, self.agent, self.role):
            if value == WILDCARD:
                return prefix.encode()
            prefix += value + "\x00"
        return (prefix + self.path).encode()


@dataclass(frozen=True)
class Address:
    """A parsed UCXL address: a context name plus a temporal selector.

    Raises:
        InvalidAddress: if a component or the path is not canonical, or the canonical
            string exceeds ``MAX_ADDRESS_LEN``.
    """

    agent: str
    role: str
    project: str
    task: str
    path: str
    temporal: Temporal

    def __post_init__(self) -> None:
        _check_name(self.agent, self.role, self.project, self.task, self.path)
        if not isinstance(self.temporal, Temporal):
            raise _temporal_error("temporal must be a Temporal", repr(self.temporal))
        canonical = self.canonical()
        _check_length(canonical, canonical)

    def canonical(self) -> str:
        """``ucxl://agent:role@project:task/TEMPORAL`` plus ``/path`` when the path is not empty."""
        found: str | None = self.__dict__.get("_canonical")
        if found is None:
            temporal = self.temporal.render()
            found = _render(self.agent, self.role, self.project, self.task, temporal, self.path)
            object.__setattr__(self, "_canonical", found)  # derived, immutable: kept
        return found

    def __str__(self) -> str:
        return self.canonical()

    @property
    def has_wildcard(self) -> bool:
        """True if any of agent/role/project/task is ``any``."""
        return WILDCARD in (self.agent, self.role, self.project, self.task)

    def context(self) -> ContextName:
        """The context this address names (the address without its temporal segment)."""
        found: ContextName | None = self.__dict__.get("_context")
        if found is None:
            # This address's components passed ``_check_name`` when it was built
            # (instances are canonical): only the length (with ``*^``) is checked again.
            found = _unchecked(
                ContextName, project=self.project, task=self.task, agent=self.agent,
                role=self.role, path=self.path,
            )  # fmt: skip
            canonical = found.canonical()
            _check_length(canonical, canonical)
            object.__setattr__(self, "_context", found)
        return found

    def with_temporal(self, t: Temporal) -> Address:
        """This address with its temporal segment replaced by ``t``."""
        return Address(self.agent, self.role, self.project, self.task, self.path, t)

    def to_json(self) -> dict[str, Any]:
        """The JSON shape: components, path, canonical string and ``Temporal.to_json()``."""
        return {
            "agent": self.agent,
            "role": self.role,
            "project": self.project,
            "task": self.task,
            "path": self.path,
            "canonical": self.canonical(),
            "temporal": self.temporal.to_json(),
        }


def _parse_canonical_context(text: str) -> ContextName:
    address = parse(text)
    if address.temporal != LATEST or address.canonical() != text:
        raise _invalid(
            "address",
            "address is not a canonical context name (ucxl://...:task/*^[/path])",
            text[:MAX_ADDRESS_LEN],
        )
    return address.context()


# a failed parse raises and is not kept; names are immutable, so sharing them is safe
_context_from_canonical = functools.lru_cache(maxsize=CANONICAL_CACHE_SIZE)(
    _parse_canonical_context
)


def _parse(text: str) -> Address:
    """``parse`` without the cache."""
    source = text[:MAX_ADDRESS_LEN]
    if len(text) > MAX_ADDRESS_LEN:
        raise _invalid("address", f"address is longer than {MAX_ADDRESS_LEN} characters", source)
    scheme = text[: len(SCHEME)]
    if not (scheme.isascii() and scheme.lower() == SCHEME):
        raise _invalid("scheme", "scheme must be 'ucxl://'", source)
    authority, slash, rest = text[len(SCHEME) :].partition("/")
    agent_role, at, project_task = authority.partition("@")
    agent, colon, role = agent_role.partition(":")
    agent = _parse_component("agent", agent, source)
    if not colon:
        raise _invalid("role", "role is missing (expected AGENT:ROLE)", source)
    role = _parse_component("role", role, source)
    if not at:
        raise _invalid("project", "project is missing (expected AGENT:ROLE@PROJECT:TASK)", source)
    project, colon, task = project_task.partition(":")
    project = _parse_component("project", project, source)
    if not colon:
        raise _invalid("task", "task is missing (expected PROJECT:TASK)", source)
    task = _parse_component("task", task, source)
    segment, _, raw_path = rest.partition("/")
    if not slash or not segment:
        raise _invalid(
            "temporal", "temporal segment is missing (expected /TEMPORAL after the task)", source
        )
    temporal = _parse_temporal(segment, source)
    path = _normalise_path(raw_path, source)
    # every component, the path and the temporal segment were just checked (and
    # normalised): the constructor's ``_check_name`` would only repeat it, so the
    # instance is built directly and only the canonical length is checked
    addr = _unchecked(
        Address, agent=agent, role=role, project=project, task=task, path=path,
        temporal=temporal,
    )  # fmt: skip
    canonical = addr.canonical()
    try:
        _check_length(canonical, canonical)
    except InvalidAddress as exc:  # only the canonical length can fail here
        exc.input = source
        raise
    return addr


_Built = TypeVar("_Built", "Address", "ContextName")


def _unchecked(cls: type[_Built], **fields: object) -> _Built:
    """An instance of the frozen dataclass ``cls`` with ``fields`` set, without its
    ``__post_init__`` checks: only for components the caller has just checked."""
    built = object.__new__(cls)
    for name, value in fields.items():
        object.__setattr__(built, name, value)
    return built


_parse_cached = functools.lru_cache(maxsize=PARSED_CACHE_SIZE)(_parse)


def parse(text: str) -> Address:
    """Parse and normalise a UCXL address (shared/UCXL.md).

    The last ``PARSED_CACHE_SIZE`` addresses parsed are kept (an ``Address`` is immutable,
    so the same instance is shared); a text that fails is parsed again each time.

    Args:
        text: e.g. ``ucxl://claude:developer@chorus:auth/~~2/src/auth/jwt.py``.

    Returns:
        The canonical ``Address``.

    Raises:
        InvalidAddress: the address is malformed; ``field`` is one of scheme, agent, role,
            project, task, temporal (missing), path or address (too long).
        TemporalInvalid: the temporal segment is malformed.
    """
    if not isinstance(text, str):  # unhashable input must fail as before, not in the cache
        return _parse(text)
    return _parse_cached(text)


def parse_temporal(segment: str) -> Temporal:
    """Parse one temporal segment (``*^``, ``*~``, ``*~N``, ``~~[N]``, ``^^[N]`` or an instant).

    Args:
        segment: the segment alone, without slashes.

    Returns:
        The canonical ``Temporal``.

    Raises:
        TemporalInvalid: the segment is malformed or a number is out of range.
    """
    return _parse_temporal(segment, segment[:MAX_ADDRESS_LEN])


def parse_instant(text: str) -> datetime:
    """Parse ``YYYY-MM-DDTHH:MM:SS[.fraction][Z|±HH:MM]`` into a UTC datetime.

    No offset means UTC. The fraction takes 1 to 9 digits; digits past microseconds are
    dropped (truncated). ``T`` and ``Z`` are upper-case.

    Args:
        text: the instant.

    Returns:
        A timezone-aware datetime in UTC.

    Raises:
        TemporalInvalid: the text is not such an instant, names no real date/time, or
            falls outside years 1..9999 once converted to UTC.
    """
    return _parse_instant(text, text[:MAX_ADDRESS_LEN])


def _parse_temporal(segment: str, source: str) -> Temporal:
    if segment == "*^":
        return LATEST
    if segment == "*~":
        return Temporal("first", None)
    for prefix, kind in _COUNTED:
        if segment.startswith(prefix):
            digits = segment[len(prefix) :]
            number = 1 if digits == "" else _parse_number(digits, source)  # "~~" means "~~1"
            if kind == "version" and number == 0:
                raise _temporal_error(
                    "temporal version numbers start at 1 (*~1 is the first version)", source
                )
            return Temporal(kind, number)
    if segment[:1].isascii() and segment[:1].isdigit():
        return Temporal("instant", _parse_instant(segment, source))
    raise _temporal_error(
        "temporal segment must be *^, *~, *~N, ~~N, ^^N or an ISO-8601 instant", source
    )


def _parse_number(digits: str, source: str) -> int:
    if not _DIGITS.fullmatch(digits):
        raise _temporal_error("temporal number must be plain ASCII digits", source)
    stripped = digits.lstrip("0") or "0"
    if len(stripped) > len(str(MAX_TEMPORAL_NUMBER)) or int(stripped) > MAX_TEMPORAL_NUMBER:
        raise _temporal_error(f"temporal number is larger than {MAX_TEMPORAL_NUMBER}", source)
    return int(stripped)


def _parse_instant(text: str, source: str) -> datetime:
    match = _INSTANT.fullmatch(text)
    if match is None:
        raise _temporal_error(
            "temporal instant must look like YYYY-MM-DDTHH:MM:SS[.fraction][Z|+HH:MM]", source
        )
    year, month, day, hour, minute, second = (int(match[i]) for i in range(1, 7))
    microsecond = int((match["fraction"] or "").ljust(6, "0")[:6])
    offset = match["offset"] or "Z"
    tz = UTC
    if offset != "Z":
        hours, minutes = int(offset[1:3]), int(offset[4:6])
        if hours > 23 or minutes > 59:
            raise _temporal_error("temporal instant has an offset beyond 23:59", source)
        sign = -1 if offset[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        local = datetime(year, month, day, hour, minute, second, microsecond, tzinfo=tz)
    except ValueError:
        raise _temporal_error("temporal instant names no real date and time", source) from None
    return _to_utc(local, source)


def _to_utc(value: datetime, source: str) -> datetime:
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise _temporal_error("temporal instant is outside years 1..9999 in UTC", source) from None


def _render_instant(value: datetime) -> str:
    # Not strftime: %Y does not zero-pad years below 1000 on every platform.
    text = (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
        f"T{value.hour:02d}:{value.minute:02d}:{value.second:02d}"
    )
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


def _render(agent: str, role: str, project: str, task: str, temporal: str, path: str) -> str:
    tail = f"/{path}" if path else ""
    return f"{SCHEME}{agent}:{role}@{project}:{task}/{temporal}{tail}"


def _parse_component(field: str, value: str, source: str) -> str:
    if value == "*":
        return WILDCARD
    _check_component(field, value, source)
    return value


def _check_name(agent: str, role: str, project: str, task: str, path: str) -> None:
    _check_component("agent", agent, agent)
    _check_component("role", role, role)
    _check_component("project", project, project)
    _check_component("task", task, task)
    _check_canonical_path(path)


def _check_component(field: str, value: str, source: str) -> None:
    if not isinstance(value, str) or not value:
        raise _invalid(field, f"{field} is empty", source)
    if not _COMPONENT_RE.fullmatch(value):
        _explain_chars(field, value, _COMPONENT_CHARS, "letters, digits, '_' and '-'", source)


def _normalise_path(raw: str, source: str) -> str:
    if not _PATH_RE.fullmatch(raw):
        _explain_chars("path", raw, _PATH_CHARS, "letters, digits, '_', '-', '.' and '/'", source)
    segments = [segment for segment in raw.split("/") if segment]
    if any(segment in (".", "..") for segment in segments):
        raise _invalid("path", "path may not contain '.' or '..' segments", source)
    return "/".join(segments)


def _check_canonical_path(path: str) -> None:
    if not isinstance(path, str):
        raise _invalid("path", "path must be a string", repr(path))
    source = path[:MAX_ADDRESS_LEN]
    if _normalise_path(path, source) != path:
        raise _invalid(
            "path", "path is not normalised (no leading, trailing or doubled '/')", source
        )


def _explain_chars(field: str, value: str, allowed: frozenset[str], wanted: str, src: str) -> None:
    for char in value:
        if char not in allowed:
            raise _invalid(field, f"{field} {_describe(char)}; allowed are {wanted}", src)
    raise _invalid(field, f"{field} is not allowed", src)  # pragma: no cover  (regex == set)


def _describe(char: str) -> str:
    if char == " ":
        return "contains a space"
    if char == "%":
        return "contains '%' (percent-escapes are not accepted)"
    if char in "?#":
        return f"contains {char!r} (queries and fragments are not accepted)"
    if not char.isprintable():
        return f"contains the control or unprintable character {char!r}"
    return f"contains {char!r}"


def _check_length(canonical: str, source: str) -> None:
    if len(canonical) > MAX_ADDRESS_LEN:
        raise _invalid(
            "address",
            f"address is longer than {MAX_ADDRESS_LEN} characters in canonical form",
            source[:MAX_ADDRESS_LEN],
        )


def _invalid(field: str, message: str, shown: str) -> InvalidAddress:
    return InvalidAddress(message, field=field, input=shown[:MAX_ADDRESS_LEN])


def _temporal_error(message: str, shown: str) -> TemporalInvalid:
    return TemporalInvalid(message, field="temporal", input=shown[:MAX_ADDRESS_LEN])
