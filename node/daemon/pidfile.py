"""A node's pid file: where it is, how it is written, read and removed.

Owns the rule: the file sits beside the node's configuration with the suffix ``.pid``
(``D/NAME/node.toml`` -> ``D/NAME/node.pid``), so a node started by hand with ``slurp
node start --config PATH`` is found exactly like one ``slurp cluster up`` started. The
file holds the process id in decimal and a newline; it is written atomically (a reader
never sees half a pid) and removed only by the process it names.
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_file_for(config_path: Path) -> Path:
    """Where the node configured by ``config_path`` writes its process id."""
    return config_path.with_suffix(".pid")


def write_pid_file(path: Path) -> None:
    """Write this process's id atomically (a reader never sees a half-written file)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(f"{os.getpid()}\n")
    partial.replace(path)


def remove_pid_file(path: Path) -> None:
    """Remove the pid file if it is still this process's."""
    if read_pid_file(path) == os.getpid():
        path.unlink(missing_ok=True)


def read_pid_file(path: Path) -> int:
    """The process id in a pid file; 0 when it is missing or does not hold a pid."""
    try:
        text = path.read_text().strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0
