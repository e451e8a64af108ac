"""A frame of one put: ``whole_answer`` (the filtered answer) equals the general split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.cluster.answers import StoreAnswer
from node.cluster.store_batch import Item, _split, split_answer, whole_answer

_ctx = st.sampled_from(["c1", "c2", "c3"])
_vid = st.text(alphabet="0123456789abcdef", min_size=1, max_size=6)
_items = st.lists(st.builds(Item, _ctx, _vid, st.just(b"blob")), min_size=1, max_size=6)


@st.composite
def frames(draw: st.DrawFn) -> tuple[list[Item], StoreAnswer]:
    items = draw(_items)
    flags = draw(
        st.lists(st.sampled_from([True, False, None]), min_size=len(items), max_size=len(items))
    )
    contexts = st.dictionaries(_ctx, st.integers(min_value=-2, max_value=50), max_size=3)
    answer = StoreAnswer(
        stored=tuple(flags),
        heads=draw(contexts),
        latest=draw(st.dictionaries(_ctx, _vid, max_size=3)),
        purged=draw(st.dictionaries(_ctx, _vid, max_size=3)),
    )
    return items, answer


@settings(max_examples=500, deadline=None)
@given(frames())
def test_a_frame_of_one_put_gets_what_the_general_split_gives(
    frame: tuple[list[Item], StoreAnswer],
) -> None:
    items, answer = frame
    expected = _split([items], answer)[0]
    assert whole_answer(items, answer) == expected
    assert split_answer([items], answer) == [expected]
