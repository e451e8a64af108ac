"""``parse`` and ``Address.context()`` build instances without the constructors' checks
(the components were checked just before): they must equal what the checking
constructors build, and keep every derived value the same."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from storage.address import Address, ContextName, Temporal, parse

_component = st.from_regex(r"[A-Za-z0-9_-]{1,12}", fullmatch=True) | st.just("*")
_segment = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,8}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
_path = st.lists(_segment, max_size=4).map("/".join)
_temporal = st.sampled_from(["*^", "*~", "*~3", "~~", "~~2", "^^4", "2024-01-02T03:04:05Z"])


@settings(max_examples=300, deadline=None)
@given(_component, _component, _component, _component, _temporal, _path, st.booleans())
def test_parsed_addresses_equal_the_checked_constructors(
    agent: str, role: str, project: str, task: str, temporal: str, path: str, star: bool
) -> None:
    text = f"ucxl://{agent}:{role}@{project}:{task}/{temporal}" + (f"/{path}" if path else "")
    addr = parse(text)
    checked = Address(addr.agent, addr.role, addr.project, addr.task, addr.path, addr.temporal)
    assert addr == checked
    assert hash(addr) == hash(checked)
    assert addr.canonical() == checked.canonical() == str(addr)
    assert parse(addr.canonical()) == addr
    assert isinstance(addr.temporal, Temporal)
    ctx = addr.context()
    expected = ContextName(addr.project, addr.task, addr.agent, addr.role, addr.path)
    assert ctx == expected
    assert hash(ctx) == hash(expected)
    assert ctx.canonical() == expected.canonical()
    assert ctx.key() == expected.key()
    assert ContextName.from_canonical(ctx.canonical()) == ctx
    assert addr.context() is ctx  # kept
