"""``ctx.history`` answers in pages that fit the answer budget; following ``more`` and
``from`` gives the whole history once, in order (as the SDK does)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from node.cluster import service
from tests.sim.harness import open_sim_cluster

A = "ucxl://claude:backend_developer@sim:paging/*^/doc.md"


async def test_history_pages_add_up_to_the_whole_history(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_sim_cluster(tmp_path) as sim:
        for i in range(5):
            await sim.call("n1", "ctx.put", {"address": A, "record": {"summary": f"v{i}"}})
        whole = await sim.call("n2", "ctx.history", {"address": A})
        assert whole["more"] is False
        assert [entry["version"] for entry in whole["history"]] == [1, 2, 3, 4, 5]
        monkeypatch.setattr(service, "MAX_BATCH_BYTES", 1)  # one entry per answer
        pages: list[list[dict[str, object]]] = []
        while True:
            body = {"address": A, "from": sum(map(len, pages))}
            answer = await sim.call("n2", "ctx.history", body)
            pages.append(answer["history"])
            if not answer["more"]:
                break
        assert [len(page) for page in pages] == [1, 1, 1, 1, 1]
        assert [entry for page in pages for entry in page] == whole["history"]
