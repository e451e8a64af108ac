"""Raft transcripts: every ``testdata/*.txt`` file replayed through ``interaction.Env``.

A file is a sequence of stanzas::

    # comments (kept on rewrite)
    command arg key=value key=(a,b)
    ----
    expected output

The output ends at the first blank line. Run with ``SLURP_REWRITE=1`` to rewrite every
file's expected outputs from the current behaviour, then review the diff with git.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.node.control.interaction import Env

TESTDATA = Path(__file__).parent / "testdata"
FILES = sorted(TESTDATA.glob("*.txt"))


@dataclass
class Stanza:
    comments: list[str]
    command: str
    expected: str


def parse(text: str) -> list[Stanza]:
    """The stanzas of a transcript file."""
    lines = text.splitlines()
    stanzas: list[Stanza] = []
    comments: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            comments.append(line)
            i += 1
            continue
        assert i + 1 < len(lines), f"line {i + 1}: a command needs ----"
        assert lines[i + 1] == "----", f"line {i + 2}: expected ----"
        out: list[str] = []
        i += 2
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        while comments and not comments[0].strip():
            comments.pop(0)
        stanzas.append(Stanza(comments, line, "\n".join(out)))
        comments = []
    return stanzas


def render(stanzas: list[Stanza]) -> str:
    blocks = ["\n".join([*s.comments, s.command, "----", s.expected]) for s in stanzas]
    return "\n\n".join(blocks) + "\n"


def replay(stanzas: list[Stanza]) -> list[str]:
    env = Env()
    outputs = []
    for s in stanzas:
        words = shlex.split(s.command)
        outputs.append(env.run(words[0], words[1:]))
    return outputs


def test_there_are_transcripts() -> None:
    """The scenarios the brief requires each have a file."""
    names = {f.stem for f in FILES}
    assert {"election", "prevote", "checkquorum", "log_repair", "snapshot", "restart"} <= names
    assert "confchange" in names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_transcript(path: Path) -> None:
    """Each command's output equals the transcript's (SLURP_REWRITE=1 rewrites them)."""
    stanzas = parse(path.read_text(encoding="utf-8"))
    outputs = replay(stanzas)
    if os.environ.get("SLURP_REWRITE") == "1":
        for s, out in zip(stanzas, outputs, strict=True):
            s.expected = out
        path.write_text(render(stanzas), encoding="utf-8")
        return
    for s, out in zip(stanzas, outputs, strict=True):
        assert out == s.expected, f"{path.name}: {s.command}\n--- got ---\n{out}"
