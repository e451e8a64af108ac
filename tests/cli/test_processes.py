"""Real processes: the data-dir lock between processes, and durability across SIGKILL.

Each test starts Python children (``python -c`` scripts using the ContextStore API) and the
real ``slurp`` console script. Assertions never depend on timing: the tests wait for lines
the children print, under a generous deadline that kills a stuck child.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

from crypto.roles import DEFAULT_ROLES
from storage.context_store import ContextStore
from storage.record import ContextRecord

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 60.0
ADDRESS = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"

HOLD_OPEN = """
import sys
from pathlib import Path
from storage.context_store import ContextStore

store = ContextStore.open(Path(sys.argv[1]))
print("open", flush=True)
sys.stdin.read()  # hold the store until the test closes our stdin
store.close()
print("closed", flush=True)
"""

WRITE_FOREVER = """
import hashlib, sys
from pathlib import Path
from storage.context_store import ContextStore
from storage.record import ContextRecord

store = ContextStore.open(Path(sys.argv[1]))
n = 0
while True:
    content = f"record {n} " + "payload " * (n % 300)  # some above the compression threshold
    fields = {"summary": f"write {n}", "content": content, "tags": [f"n{n}"]}
    address = f"ucxl://writer:backend_developer@durability:crash/*^/item-{n % 7}"
    ref = store.store(address, ContextRecord.from_fields(fields))
    digest = hashlib.sha256(content.encode()).hexdigest()
    # acknowledged: store() returned, so the write must survive anything from here on
    print(ref.address, ref.version_id, n, digest, flush=True)
    n += 1
"""


def child_env() -> dict[str, str]:
    """The environment of a child: this checkout first on the import path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def slurp_command() -> list[str]:
    """The installed ``slurp`` console script next to this interpreter (or an equivalent)."""
    found = shutil.which("slurp", path=str(Path(sys.executable).parent))
    if found is not None:
        return [found]
    return [sys.executable, "-c", "from cli.main import main; main()"]


def run_slurp(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``slurp --data-dir DATA_DIR ARGS...`` as a real process."""
    return subprocess.run(
        [*slurp_command(), "--data-dir", str(data_dir), *args],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=child_env(),
        check=False,
    )


@contextmanager
def python_child(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A ``python -c script args...`` child with piped stdio, killed at the deadline or exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    watchdog = threading.Timer(DEADLINE_S, proc.kill)  # a stuck child: readline sees EOF
    watchdog.start()
    try:
        yield proc
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert "Traceback" not in err or proc.returncode == -signal.SIGKILL, err


def read_line(stream: IO[str] | None) -> str:
    """The next line a child printed (empty at EOF)."""
    assert stream is not None
    return stream.readline()


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    """An initialised data directory with the default roles."""
    root = tmp_path / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    return root


def test_a_second_process_gets_a_clear_in_use_error(node_dir: Path) -> None:
    with ContextStore.open(node_dir) as store:
        store.store(ADDRESS, ContextRecord.from_fields({"summary": "before"}))

    with python_child(HOLD_OPEN, str(node_dir)) as holder:
        assert read_line(holder.stdout) == "open\n"

        busy = run_slurp(node_dir, "get", ADDRESS)
        assert busy.returncode != 0
        assert busy.stderr.startswith("UCXL-409-DATA_DIR_IN_USE: "), busy.stderr
        assert "Traceback" not in busy.stderr
        assert busy.stdout == ""

        busy_json = run_slurp(node_dir, "put", ADDRESS, "--summary", "while busy", "--json")
        assert busy_json.returncode != 0
        error = json.loads(busy_json.stdout)["error"]
        assert (error["code"], error["field"]) == ("UCXL-409-DATA_DIR_IN_USE", "data_dir")
        assert "Traceback" not in busy_json.stderr

        assert holder.stdin is not None
        holder.stdin.close()
        assert read_line(holder.stdout) == "closed\n"
        assert holder.wait(timeout=DEADLINE_S) == 0

    with ContextStore.open(node_dir) as store:  # the lock is free again
        assert [entry.version for entry in store.history(ADDRESS)] == [1]  # the put wrote nothing


def test_every_acknowledged_write_survives_sigkill(node_dir: Path) -> None:
    wanted = 100
    acks: list[tuple[str, str, int, str]] = []
    with python_child(WRITE_FOREVER, str(node_dir)) as writer:
        while len(acks) < wanted:
            line = read_line(writer.stdout)
            if not line:
                assert writer.stderr is not None
                pytest.fail(f"the writer stopped after {len(acks)} writes: {writer.stderr.read()}")
            address, version_id, serial, digest = line.split()
            acks.append((address, version_id, int(serial), digest))
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=DEADLINE_S) == -signal.SIGKILL

    assert [n for _, _, n, _ in acks] == list(range(wanted))
    with ContextStore.open(node_dir) as store:
        for address, version_id, n, digest in acks:
            view = store.retrieve(address)
            assert view.version_id == version_id, address
            assert view.summary == f"write {n}"
            assert view.tags == (f"n{n}",)
            content = view.content
            assert isinstance(content, str)
            assert hashlib.sha256(content.encode()).hexdigest() == digest, address

        # the index recovered after the crash: each context's latest version is searchable
        latest = {
            item.context: item.latest_version_id
            for item in store.list_contexts("ucxl://any:any@durability:crash/*^")
        }
        assert len(latest) == 7
        for context, version_id in latest.items():
            serial = store.retrieve(context).summary.removeprefix("write ")
            hits = store.search("", tags=[f"n{serial}"], as_role="backend_developer")
            assert [(h.context, h.version_id) for h in hits] == [(context, version_id)]
