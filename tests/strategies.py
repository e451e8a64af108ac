"""Shared hypothesis strategies for slurp's tests (UCXL addresses and their parts).

Every strategy here generates *valid, canonical* values unless its name says otherwise, and
keeps sizes small so property tests stay fast. Addresses stay far below MAX_ADDRESS_LEN.
"""

from __future__ import annotations

import string
from datetime import UTC, datetime, timedelta, timezone

from hypothesis import strategies as st

from storage.address import (
    MAX_TEMPORAL_NUMBER,
    WILDCARD,
    Address,
    ContextName,
    Temporal,
)

COMPONENT_ALPHABET = string.ascii_letters + string.digits + "_-"
PATH_ALPHABET = COMPONENT_ALPHABET + "."


def concrete_components() -> st.SearchStrategy[str]:
    """A concrete agent/role/project/task value: 1-12 of ``[A-Za-z0-9_-]``, never ``any``."""
    return st.text(COMPONENT_ALPHABET, min_size=1, max_size=12).filter(lambda s: s != WILDCARD)


def components(*, wildcards: bool = True) -> st.SearchStrategy[str]:
    """A component value; with ``wildcards``, ``any`` about a quarter of the time."""
    if not wildcards:
        return concrete_components()
    return st.one_of(concrete_components(), concrete_components(), st.just(WILDCARD))


def path_segments() -> st.SearchStrategy[str]:
    """One path segment: 1-10 of ``[A-Za-z0-9_.-]``, never ``.`` or ``..``."""
    return st.text(PATH_ALPHABET, min_size=1, max_size=10).filter(lambda s: s not in (".", ".."))


def paths() -> st.SearchStrategy[str]:
    """A normalised path of 0-4 segments (``""`` included)."""
    return st.lists(path_segments(), max_size=4).map("/".join)


def instants() -> st.SearchStrategy[datetime]:
    """A timezone-aware UTC datetime in years 1..9999, with or without microseconds."""
    return st.datetimes(
        min_value=datetime(1, 1, 1),
        max_value=datetime(9999, 12, 31, 23, 59, 59, 999999),
        timezones=st.just(UTC),
    )


def temporals() -> st.SearchStrategy[Temporal]:
    """Any valid Temporal, every kind, numbers across their whole range."""
    return st.one_of(
        st.just(Temporal("latest", None)),
        st.just(Temporal("first", None)),
        st.integers(1, MAX_TEMPORAL_NUMBER).map(lambda n: Temporal("version", n)),
        st.integers(0, MAX_TEMPORAL_NUMBER).map(lambda n: Temporal("back", n)),
        st.integers(0, MAX_TEMPORAL_NUMBER).map(lambda n: Temporal("forward", n)),
        instants().map(lambda dt: Temporal("instant", dt)),
    )


def context_names(*, wildcards: bool = False) -> st.SearchStrategy[ContextName]:
    """A ContextName; concrete unless ``wildcards`` (then any component may be ``any``)."""
    part = components(wildcards=wildcards)
    return st.builds(ContextName, project=part, task=part, agent=part, role=part, path=paths())


def addresses(*, wildcards: bool = False) -> st.SearchStrategy[Address]:
    """An Address; concrete unless ``wildcards``; any temporal."""
    return st.builds(
        lambda name, temporal: name.address(temporal),
        context_names(wildcards=wildcards),
        temporals(),
    )


@st.composite
def patterns_matching(draw: st.DrawFn, concrete: ContextName) -> tuple[ContextName, bool]:
    """A (pattern, path_prefix) pair such that ``pattern.matches(concrete, path_prefix=...)``.

    Each component is kept or replaced by ``any``; with path_prefix the path is cut to a
    leading run of its segments (possibly none).
    """

    def keep_or_any(value: str) -> str:
        return draw(st.sampled_from([value, WILDCARD]))

    path_prefix = draw(st.booleans())
    path = concrete.path
    if path_prefix:
        segments = path.split("/") if path else []
        path = "/".join(segments[: draw(st.integers(0, len(segments)))])
    pattern = ContextName(
        project=keep_or_any(concrete.project),
        task=keep_or_any(concrete.task),
        agent=keep_or_any(concrete.agent),
        role=keep_or_any(concrete.role),
        path=path,
    )
    return pattern, path_prefix


def _spell_component(value: str) -> st.SearchStrategy[str]:
    return st.sampled_from(["*", WILDCARD]) if value == WILDCARD else st.just(value)


def _spell_temporal(temporal: Temporal) -> st.SearchStrategy[str]:
    canonical = temporal.render()
    if temporal.kind in ("back", "forward") and temporal.value == 1:
        return st.sampled_from([canonical, canonical[:2]])  # "~~" means "~~1"
    if temporal.kind in ("version", "back", "forward"):
        return st.sampled_from([canonical, canonical[:2] + "00" + canonical[2:]])
    if isinstance(temporal.value, datetime):
        dt = temporal.value
        local = dt.replace(tzinfo=None).isoformat(timespec="microseconds")
        shifted = st.integers(-23 * 60, 23 * 60).map(
            lambda minutes: _with_offset(dt, timedelta(minutes=minutes), canonical)
        )
        return st.one_of(st.just(canonical), st.just(local), shifted)
    return st.just(canonical)


def _with_offset(dt: datetime, offset: timedelta, canonical: str) -> str:
    """``dt`` written in the zone ``offset`` as ``...±HH:MM`` (``canonical`` on overflow)."""
    try:
        return dt.astimezone(timezone(offset)).isoformat(timespec="microseconds")
    except (OverflowError, ValueError):
        return canonical


@st.composite
def address_spellings(draw: st.DrawFn) -> tuple[str, Address]:
    """A non-canonical but valid spelling of an address, with the Address it must parse to.

    Varies scheme case, ``*`` for ``any``, extra slashes in the path, ``~~``/``^^`` without
    a number, leading zeros, and instants with offsets or without a zone.
    """
    address = draw(addresses(wildcards=True))
    scheme = draw(st.sampled_from(["ucxl://", "UCXL://", "Ucxl://", "uCxL://"]))
    agent, role, project, task = (
        draw(_spell_component(v))
        for v in (address.agent, address.role, address.project, address.task)
    )
    temporal = draw(_spell_temporal(address.temporal))
    glue = st.sampled_from(["/", "//", "///"])
    path = "".join(draw(glue) + segment for segment in address.path.split("/") if segment)
    path += draw(st.sampled_from(["", "/", "//"]))
    return f"{scheme}{agent}:{role}@{project}:{task}/{temporal}{path}", address
