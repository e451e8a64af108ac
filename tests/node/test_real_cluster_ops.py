"""Real tier: operator tooling on three real node processes tells the truth.

Invariants checked: every node writes its own pid file (removed on a clean exit);
``cluster up`` on a running cluster starts nothing and keeps every pid; after a SIGKILL it
restarts exactly the dead node (the others keep their pids) and every node is healthy; a
node restarted by hand with ``slurp node start --config`` shows as up; a second daemon on
the same data directory is refused and leaves the first one's pid file alone; the status
fields (contexts, backlog, antientropy) are present per node and agree with /metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node.daemon.ops import cluster_down, cluster_status, start_cluster
from node.daemon.pidfile import read_pid_file

pytestmark = pytest.mark.slow
TIMEOUT_S = 120.0
ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what}: not true after {timeout_s} s")


def alive(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_file_holds(path: Path, pid: int) -> bool:
    return read_pid_file(path) == pid


def nodes(root: Path) -> dict[str, dict[str, Any]]:
    return {node["name"]: node for node in cluster_status(root)["nodes"]}


def metrics(http_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{http_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def exported_metrics(http_port: int) -> dict[str, float]:
    """/metrics once the daemon's metrics loop has run (the disk ratio is its first figure)."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        found = metrics(http_port)
        if "slurp_disk_free_ratio" in found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no metrics loop pass on port {http_port}")


def slurp(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURP_")}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True,
        timeout=TIMEOUT_S, cwd=ROOT, env=env, check=False,
    )  # fmt: skip


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "cluster"
    try:
        yield root
    finally:
        if (root / "cluster.json").exists():
            cluster_down(root)


def test_cluster_up_restarts_only_the_nodes_that_are_down(cluster_dir: Path) -> None:
    root = cluster_dir
    first = start_cluster(root, 3, timeout_s=TIMEOUT_S)
    assert first.created
    assert first.started == ["node1", "node2", "node3"]
    pids = {m.name: m.pid for m in first.nodes}
    for name, pid in pids.items():  # each node wrote its own pid file
        path = root / name / "node.pid"
        wait_for(partial(pid_file_holds, path, pid), f"{name}'s pid file")
    again = slurp("cluster", "up", "--dir", str(root), "--json")
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout)
    assert answer["started"] == []
    assert {n["name"]: n["pid"] for n in answer["nodes"]} == pids

    os.kill(pids["node3"], signal.SIGKILL)
    wait_for(lambda: not alive(pids["node3"]), "node3 dead")
    assert read_pid_file(root / "node3" / "node.pid") == pids["node3"]  # stale, left behind
    assert nodes(root)["node3"]["up"] is False

    text = slurp("cluster", "up", "--dir", str(root))
    assert text.returncode == 0, text.stderr
    assert "started node3 (2 of 3 were already up)" in text.stdout
    after = nodes(root)
    assert {name: after[name]["pid"] for name in ("node1", "node2")} == {
        "node1": pids["node1"], "node2": pids["node2"],
    }  # fmt: skip
    assert after["node3"]["pid"] not in (0, pids["node3"])
    assert all(node["up"] for node in after.values())

    for node in after.values():  # the status fields, and /metrics telling the same
        assert isinstance(node["contexts"], int)
        assert set(node["backlog"]) == {"hints", "hint_bytes", "repair_pending"}
        assert set(node["antientropy"]) == {"last_pass_age_s", "versions_repaired"}
        assert isinstance(node["backlog"]["repair_pending"], int)
        exported = exported_metrics(node["http_port"])
        assert 0.0 <= exported["slurp_disk_free_ratio"] <= 1.0
        if node["backlog"]["hints"] is None:
            assert "slurp_hints" not in exported
        else:
            assert "slurp_hints" in exported
        if node["antientropy"]["last_pass_age_s"] is None:
            assert "slurp_antientropy_last_pass_age_seconds" not in exported


def test_a_node_started_by_hand_shows_up(cluster_dir: Path) -> None:
    root = cluster_dir
    members = {m.name: m for m in start_cluster(root, 3, timeout_s=TIMEOUT_S).nodes}
    pid_file = root / "node2" / "node.pid"
    os.kill(members["node2"].pid, signal.SIGTERM)
    wait_for(lambda: not alive(members["node2"].pid), "node2 stopped")
    assert not pid_file.exists()  # a clean exit removes it

    config = root / "node2" / "node.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURP_")}
    with (root / "node2" / "by-hand.log").open("ab") as log:
        by_hand = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "node", "start", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: nodes(root)["node2"]["up"], "node2 up after a start by hand")
        assert nodes(root)["node2"]["pid"] == by_hand.pid
        assert read_pid_file(pid_file) == by_hand.pid

        second = slurp("node", "start", "--config", str(config))  # same data directory
        assert second.returncode == 1
        assert read_pid_file(pid_file) == by_hand.pid  # the refused one did not touch it
        assert alive(by_hand.pid)
    finally:
        cluster_down(root)
        by_hand.wait(timeout=30)
    assert not pid_file.exists()
