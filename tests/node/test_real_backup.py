"""Real tier: a node process with ``[backup] schedule`` set backs up its own store at start,
the backup verifies with the admin identity, and ``node.status`` reports it."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from node.daemon.ops import cluster_down, cluster_up, start_cluster
from storage import backup_io
from tests.node.test_real_cluster import call, tls

pytestmark = pytest.mark.slow


async def test_a_scheduled_node_backs_itself_up(tmp_path: Path) -> None:
    root = tmp_path / "c"
    cluster_up(root, 1, timeout_s=90)
    try:
        cluster_down(root)
        config = root / "node1" / "node.toml"
        text = config.read_text(encoding="utf-8")
        assert "# schedule: unset" in text
        lines = [
            'schedule = "1h"' if line.startswith("# schedule: unset") else line
            for line in text.splitlines()
        ]
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        (node,) = start_cluster(root, 1, timeout_s=90).nodes
        backups = root / "node1" / "data" / "backups"
        with trio.fail_after(60):
            while not backup_io.list_backups(backups):  # noqa: ASYNC110 - another process
                await trio.sleep(0.2)
        (entry,) = backup_io.list_backups(backups)
        assert entry["kind"] == "full"
        status = await call(node.rpc_port, tls(root), "node.status", {})
        assert status["backup"]["schedule_s"] == 3600
        assert status["backup"]["failures"] == 0
        assert status["backup"]["warning"] is None
    finally:
        cluster_down(root)
