"""Backup benchmark (issue 11, "Measure"): backup MB/s and restore records/s beside
``tar`` + ``age`` of the raw data directory, in the same run.

For N contexts of ~1 KB records (``bench_store.Corpus``; every third context gets a second
version, so there are about 1.33 N versions) it measures, on one store:

- **create**: ``storage.backup_io.create`` with ``--with-keys`` (what a fresh restore
  needs), against ``tar -cf - DATA_DIR | age -r ADMIN`` of the closed data directory.
  MB/s are of the data directory's bytes on disk (the same input for both); the backup
  file's size is given beside.
- **restore**: into a fresh directory (``storage.restore``: decrypt and verify the whole
  file, then build the node and merge), against ``age -d | tar -x``. Records/s are
  versions restored per second of the whole restore; the split (open + verify, merge,
  re-index) is given beside.

Output: a table on stdout and the same as Markdown between ``<!-- bench:backup:start -->``
and ``<!-- bench:backup:end -->`` in ``--out`` (BENCHMARKS.md by default; the rest of the
file is left as it was). Scratch data goes to ``bench-data/`` and is deleted unless
``--keep``. Run it as ``scripts/bench backup --contexts N``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench_report import git_revision, write_section  # scripts/, on sys.path
from bench_store import BATCH_SIZE, Corpus

from crypto.keyring import read_identity_file
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from storage import backup_io, restore
from storage.context_store import ContextStore, WriteRequest

ROOT = Path(__file__).resolve().parent.parent
START_MARKER = "<!-- bench:backup:start -->"
END_MARKER = "<!-- bench:backup:end -->"
MB = 1_000_000
T = TypeVar("T")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def populate(data: Path, contexts: int, seed: int) -> int:
    """``contexts`` contexts, a second version for every third; returns versions."""
    ContextStore.init(data, DEFAULT_ROLES)
    corpus = Corpus(seed)
    versions = 0
    with ContextStore.open(data) as store:
        for start in range(0, contexts, BATCH_SIZE):
            items = corpus.items(start, min(contexts, start + BATCH_SIZE))
            store.store_batch([WriteRequest(it.address, it.record) for it in items])
            again = [it for it in items if corpus_index(it.address) % 3 == 0]
            store.store_batch([WriteRequest(it.address, it.record) for it in again])
            versions += len(items) + len(again)
            if (start // BATCH_SIZE) % max(1, contexts // BATCH_SIZE // 10) == 0:
                log(f"populate {start + len(items):,}/{contexts:,}")
        store.index.commit()
    return versions


def corpus_index(address: str) -> int:
    """The corpus index ``i`` in an address's path (``..._0000042.py``)."""
    return int(address.rsplit("_", 1)[1].split(".")[0])


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def shell(command: str) -> None:
    subprocess.run(["bash", "-o", "pipefail", "-c", command], check=True)


@dataclass
class Found:
    contexts: int
    versions: int = 0
    raw_bytes: int = 0
    backup_bytes: int = 0
    base_file_bytes: int = 0
    create_s: float = 0.0
    base_create_s: float = 0.0
    load_s: float = 0.0
    merge_s: float = 0.0
    index_s: float = 0.0
    base_restore_s: float = 0.0
    ab: dict[str, list[float]] = field(default_factory=dict)  # --ab: merge seconds by mode


def run(
    work: Path, contexts: int, seed: int, *, reverify: bool = False, ab_rounds: int = 0
) -> Found:
    found = Found(contexts)
    data = work / "data"
    log(f"populating {contexts:,} contexts")
    found.versions = populate(data, contexts, seed)
    found.raw_bytes = dir_bytes(data)
    log(f"{found.versions:,} versions, data directory {found.raw_bytes / MB:,.1f} MB")
    with ContextStore.open(data) as store:
        recipient = store.keyring.recipient(ADMIN_ROLE)
    identity = data / "keys" / f"{ADMIN_ROLE}.key"

    base_file = work / "raw.tar.age"
    found.base_create_s, _ = timed(
        lambda: shell(f"tar -C {data} -cf - . | age -r {recipient} -o {base_file}")
    )
    found.base_file_bytes = base_file.stat().st_size
    log(f"tar + age: {found.base_create_s:.2f} s")
    out = work / "full.slurp-backup.age"
    with ContextStore.open(data) as store:
        found.create_s, _ = timed(
            lambda: backup_io.create(store, out, cluster_id=store.keyring.node_id, with_keys=True)
        )
    found.backup_bytes = out.stat().st_size
    log(f"backup create: {found.create_s:.2f} s")

    base_target = work / "raw-restored"
    base_target.mkdir()
    found.base_restore_s, _ = timed(
        lambda: shell(f"age -d -i {identity} {base_file} | tar -C {base_target} -xf -")
    )
    log(f"age -d + tar -x: {found.base_restore_s:.2f} s")
    opener = backup_io.Opener(identities=[read_identity_file(identity)])
    target = work / "restored"
    result = restore.Restored(target, [str(out)], created_node=False)
    found.load_s, chain = timed(
        lambda: restore.load_chain([out], opener, target_cluster=None, trusted=None)
    )
    refresh = restore._refresh
    reverify_now = [reverify]

    def timed_refresh(store: ContextStore, touched: Any, checked: Any) -> None:
        memo = {} if reverify_now[0] else checked  # reverify: as before the verified memo
        spent, _ = timed(lambda: refresh(store, touched, memo))
        if not found.merge_s:  # the main restore's (the A/B rounds come after it)
            found.index_s = spent

    restore._refresh = timed_refresh  # the re-index at the end of a merge, timed apart
    try:
        found.merge_s, _ = timed(lambda: restore.restore_fresh(target, chain, None, None, result))
        log(
            f"restore: open + verify {found.load_s:.2f} s, build + merge {found.merge_s:.2f} s "
            f"(of which re-index {found.index_s:.2f} s)"
        )
        for round_ in range(ab_rounds):  # the same merge, with and without the memo, alternated
            for mode in (True, False) if round_ % 2 == 0 else (False, True):
                reverify_now[0] = mode
                again = work / f"ab-{round_}-{int(mode)}"
                merged = restore.Restored(again, [str(out)], created_node=False)
                spent, _ = timed(
                    lambda again=again, merged=merged: restore.restore_fresh(
                        again, chain, None, None, merged
                    )
                )
                found.ab.setdefault("reverify" if mode else "memo", []).append(spent)
                shutil.rmtree(again)
            log(f"A/B round {round_ + 1}: {found.ab}")
    finally:
        restore._refresh = refresh
    if result.added != found.versions:
        raise SystemExit(f"restored {result.added} versions of {found.versions}")
    return found


def report(f: Found) -> str:
    raw_mb = f.raw_bytes / MB
    restore_s = f.load_s + f.merge_s
    load = os.getloadavg()
    return "\n".join([
        f"Backups: `scripts/bench backup --contexts {f.contexts:,}` ({f.versions:,} versions;"
        f" revision {git_revision()}, Python {platform.python_version()}, {os.cpu_count()}"
        f" cores, load {load[0]:.2f}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC). Data directory"
        f" {raw_mb:,.1f} MB; backup file {f.backup_bytes / MB:,.1f} MB; tar+age file"
        f" {f.base_file_bytes / MB:,.1f} MB.",
        "",
        "| metric | slurp | baseline, same run | slurp time / baseline time |",
        "|---|--:|--:|--:|",
        f"| backup create, MB/s of the data directory | {raw_mb / f.create_s:,.1f} MB/s"
        f" ({f.create_s:.2f} s) | `tar` + `age`: {raw_mb / f.base_create_s:,.1f} MB/s"
        f" ({f.base_create_s:.2f} s) | {f.create_s / f.base_create_s:,.1f}x |",
        f"| restore into a fresh directory, versions/s | {f.versions / restore_s:,.0f}/s"
        f" ({restore_s:.2f} s) | `age -d` + `tar -x`: {f.base_restore_s:.2f} s"
        f" | {restore_s / f.base_restore_s:,.1f}x |",
        "",
        f"Restore split: open and verify every member and signature {f.load_s:.2f} s; build"
        f" the node and merge {f.merge_s - f.index_s:.2f} s; re-index {f.index_s:.2f} s.",
        *_ab_lines(f),
    ])  # fmt: skip


def _ab_lines(f: Found) -> list[str]:
    if not f.ab:
        return []
    memo, before = statistics.median(f.ab["memo"]), statistics.median(f.ab["reverify"])
    return [
        "",
        f"Build + merge + re-index, A/B in this run ({len(f.ab['memo'])} rounds each,"
        f" alternated): each head's signature verified once (now) median {memo:.2f} s"
        f" ({f.versions / memo:,.0f} versions/s); verified again to index it (before) median"
        f" {before:.2f} s ({f.versions / before:,.0f} versions/s).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--contexts", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="2,000 contexts")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch data")
    parser.add_argument(
        "--ab", type=int, default=0, help="rounds of merges with and without the verified memo"
    )
    parser.add_argument(
        "--reverify",
        action="store_true",
        help="re-verify each head's signature to index it (restore before the memo)",
    )
    args = parser.parse_args()
    contexts = 2_000 if args.quick else args.contexts
    scratch = ROOT / "bench-data"
    scratch.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="backup-", dir=scratch))
    try:
        body = report(run(work, contexts, args.seed, reverify=args.reverify, ab_rounds=args.ab))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(body)
    write_section(args.out, body, START_MARKER, END_MARKER)


if __name__ == "__main__":
    main()
