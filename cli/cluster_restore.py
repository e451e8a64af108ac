"""``slurp --profile P restore FILE...``: a backup merged into a running cluster (issue 11).

Owns the client side of ``restore.upload``/``restore.apply`` (node/rpc/api.py): each file
goes to the leader in ``CHUNK_BYTES`` chunks, then the merge is driven step by step from
the cursor the leader answers, summing its counts. The leader verifies everything before
its first write, and every step is idempotent (node/control/cluster_restore.py), so a
step answered ``UCXL-503`` (out of time, a busy node) is sent again from the same cursor, and
a failed run is simply run again.
Must not know: the backup format, how the leader merges.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.progress import Progress

from cli import render
from cli.backend import connect
from cli.common import STATE, fail, run
from storage.errors import InvalidPayload, StorageError, Unavailable

CHUNK_BYTES = 4 << 20  # the most a restore.upload carries
VERIFY_POLL_S = 0.5
MAX_STEP_RETRIES = 5  # a step is idempotent: one that timed out is sent again
COUNTS = ("versions_sent", "already_held", "purged", "purges_applied", "purges_held")


def restore_cluster(files: list[Path], as_json: bool) -> None:
    """Upload ``files`` to the leader and merge them; print the summary."""
    STATE.refused = None  # the remote form of an otherwise embedded-only command
    for path in files:
        if not path.is_file():
            fail(InvalidPayload(f"{path} is not a file", field="file"), as_json)
    remote = run(as_json, lambda: connect(STATE.remote))
    try:
        client = remote.client
        summary = run(as_json, lambda: restore_files(client, files, as_json))
    finally:
        remote.close()
    if as_json:
        render.print_json(summary)
    else:
        render.out.print(
            f"restored {len(files)} file(s) into the cluster: {summary['versions_sent']} "
            f"versions sent, {summary['already_held']} already held, {summary['purged']} "
            f"covered by a purge marker, {summary['purges_applied']} purge markers applied "
            f"(cut {summary['cut']})",
            markup=False,
        )


def restore_files(client: Any, files: list[Path], as_json: bool) -> dict[str, Any]:
    """Upload ``files`` to the leader through ``client``, drive the merge, and answer the
    summary (the ``--json`` shape of ``slurp --profile P restore``)."""
    uploads: list[str] = []
    total = sum(path.stat().st_size for path in files)
    with Progress(console=render.err, disable=as_json) as bar:
        task = bar.add_task("uploading", total=total)
        for path in files:
            upload: str | None = None
            offset = 0
            with path.open("rb") as handle:
                while True:
                    chunk = handle.read(CHUNK_BYTES)
                    if not chunk and upload is not None:
                        break
                    upload = client.restore_upload(chunk, offset, upload)
                    offset += len(chunk)
                    bar.update(task, advance=len(chunk))
                    if not chunk:
                        break
            assert upload is not None
            uploads.append(upload)
        merge = bar.add_task("verifying", total=None)
        counts = dict.fromkeys(COUNTS, 0)
        cursor = 0
        failures = 0
        while True:
            try:
                answer = client.restore_apply(uploads, cursor)
            except Unavailable:  # a step that ran out of time: run again from the cursor
                failures += 1
                if failures > MAX_STEP_RETRIES:
                    raise
                time.sleep(VERIFY_POLL_S * failures)
                continue
            failures = 0
            if answer.get("phase") == "verifying":
                time.sleep(VERIFY_POLL_S)
                continue
            for name in COUNTS:
                counts[name] += int(answer.get("counts", {}).get(name, 0))
            cursor = int(answer["cursor"])
            bar.update(merge, description="merging", completed=cursor, total=answer.get("units"))
            if answer.get("done"):
                break
    if not isinstance(answer.get("total_versions"), int):
        raise StorageError("restore.apply: the leader answered no total")
    return {
        "files": [str(path) for path in files],
        "versions_total": answer["total_versions"],
        **counts,
        "cut": answer.get("cut"),
    }
