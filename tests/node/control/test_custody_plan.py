"""The pure decisions of admin custody (``node.control.custody_plan``) and the fence rule
(``node.control.fence.check_term``), checked against tables and slow obvious references."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.control.custody_plan import (
    MAX_RETRY_S,
    Action,
    Route,
    custody_action,
    retry_delay_s,
    route,
    share_refusal,
)
from node.control.fence import StaleTerm, check_term

terms = st.one_of(st.none(), st.integers(0, 5))


@given(leader_term=terms, held_term=terms)
def test_the_identity_is_kept_only_for_the_current_leader_term(
    leader_term: int | None, held_term: int | None
) -> None:
    """Held for another term -> WIPE; for this one -> KEEP; not held -> COLLECT iff leading."""
    action = custody_action(leader_term, held_term)
    if held_term is None:
        assert action is (Action.IDLE if leader_term is None else Action.COLLECT)
    else:
        assert action is (Action.KEEP if leader_term == held_term else Action.WIPE)


def test_retries_back_off_doubling_up_to_the_bound() -> None:
    delays = [retry_delay_s(0.1, failures) for failures in range(8)]
    assert delays[:5] == pytest.approx([0.0, 0.1, 0.2, 0.4, 0.8])
    assert max(delays) == MAX_RETRY_S
    assert retry_delay_s(0.1, 10_000) == MAX_RETRY_S
    assert retry_delay_s(5.0, 3) == 5.0  # never below the check interval itself


@pytest.mark.parametrize(
    ("asker", "leader", "term", "current", "why"),
    [
        ("n1", "n1", 4, 4, None),
        ("n1", None, 4, 4, "no leader known"),
        ("n3", "n1", 4, 4, "n3 is not the leader I know (n1)"),
        ("n1", "n1", 3, 4, "stale term 3 < 4"),
        ("n1", "n1", 5, 4, "ahead of mine"),
    ],
)
def test_a_share_goes_only_to_the_known_leader_for_the_current_term(
    asker: str, leader: str | None, term: int, current: int, why: str | None
) -> None:
    refusal = share_refusal(asker, leader, term, current)
    if why is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert why in refusal


ADMIN = ("admin",)


@pytest.mark.parametrize(
    ("method", "as_role", "roles", "holds", "leads", "forwarded", "where"),
    [
        ("ctx.get", "admin", ADMIN, False, False, False, Route.FORWARD),
        ("ctx.get", "admin", ADMIN, True, False, False, Route.LOCAL),
        ("ctx.get", "admin", ADMIN, False, True, False, Route.NOT_READY),
        ("ctx.get", "admin", ADMIN, False, False, True, Route.NOT_READY),  # never twice
        ("ctx.get_batch", "admin", ADMIN, False, False, False, Route.FORWARD),
        ("ctx.history", "admin", ADMIN, False, False, False, Route.FORWARD),
        ("ctx.get", "observer", ADMIN, False, False, False, Route.LOCAL),
        ("ctx.get", None, ADMIN, False, False, False, Route.LOCAL),
        ("ctx.get", "admin", ("observer",), False, False, False, Route.LOCAL),  # refused here
        ("ctx.purge", None, ADMIN, True, False, False, Route.FORWARD),  # always the leader's
        ("ctx.purge", None, ADMIN, True, True, False, Route.LOCAL),
        ("ctx.purge", None, ADMIN, False, True, False, Route.NOT_READY),
        ("ctx.purge", None, ADMIN, False, False, True, Route.NOT_READY),
        ("ctx.purge", None, ("observer",), False, False, False, Route.LOCAL),  # refused here
        ("ctx.put", "admin", ADMIN, False, False, False, Route.LOCAL),
        ("ctx.search", "admin", ADMIN, False, False, False, Route.LOCAL),
    ],
)
def test_requests_that_need_the_admin_identity_go_where_it_is(
    method: str,
    as_role: str | None,
    roles: tuple[str, ...],
    holds: bool,
    leads: bool,
    forwarded: bool,
    where: Route,
) -> None:
    got = route(method, as_role, roles, holds_admin=holds, is_leader=leads, forwarded=forwarded)
    assert got is where


@given(term=st.integers(0, 20), fence=st.integers(0, 20), current=st.integers(0, 20))
def test_the_fence_refuses_exactly_the_terms_below_what_was_seen(
    term: int, fence: int, current: int
) -> None:
    """Refused iff term < max(fence, current); accepted -> the fence becomes max(fence, term)."""
    if term < fence or term < current:
        with pytest.raises(StaleTerm) as caught:
            check_term(term, fence, current)
        assert caught.value.field == "term"
        assert f"stale leader term {term} < {max(fence, current)}" in caught.value.message
    else:
        assert check_term(term, fence, current) == max(fence, term)
