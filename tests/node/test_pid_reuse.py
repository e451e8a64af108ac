"""A pid file that names a live process which is not a slurp node counts as down, so
``cluster up`` restarts the node and ``cluster down`` never signals that process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.daemon import ops

pytestmark = pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc")


def test_a_live_process_that_is_not_a_node_is_not_taken_for_one() -> None:
    assert ops._alive(os.getpid()) is False  # pytest, not `node start`
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert ops._alive(other.pid) is False
    finally:
        other.kill()
        other.wait()


def test_a_process_running_node_start_is_taken_for_a_node() -> None:
    # argv[0] is the interpreter; the arguments are what `cluster up` passes (never run here)
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "node", "start", "--config", "x"]
    )
    try:
        _wait_exec(fake.pid, b"node")  # until then /proc shows the forking parent's cmdline
        assert ops._alive(fake.pid) is True
    finally:
        fake.kill()
        fake.wait()
    assert ops._alive(fake.pid) is False


def _wait_exec(pid: int, marker: bytes, timeout_s: float = 30.0) -> None:
    """Wait until ``pid`` has exec'd a command line holding ``marker``."""
    deadline = time.monotonic() + timeout_s
    while marker not in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
        assert time.monotonic() < deadline, f"process {pid} never exec'd"
        time.sleep(0.01)


def test_a_node_this_process_started_is_alive_before_it_execs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between fork and exec a child's /proc cmdline is still ours: Popen decides."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    monkeypatch.setitem(ops._CHILDREN, child.pid, child)
    try:
        assert ops._alive(child.pid) is True  # no `node start` in its cmdline, yet ours
    finally:
        child.kill()
        child.wait()
    assert ops._alive(child.pid) is False
    assert child.pid not in ops._CHILDREN
