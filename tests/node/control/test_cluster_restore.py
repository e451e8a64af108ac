"""The leader side of a cluster restore, in isolation: ``restore.upload``'s chunks,
offsets, retries and the ``[backup] restore_max_bytes`` bound, the admin-role check, the
leader-only refusal, and the request shapes of ``restore.*`` (named fields).

The merge itself runs on real processes (tests/node/test_real_cluster_restore.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from node.cluster.requests import MAX_RESTORE_CHUNK, parse_request
from node.control.cluster_restore import ClusterRestore
from node.rpc.transport import Peer
from storage.errors import Forbidden, InvalidPayload, NotFound, Unavailable

ADMIN = Peer(name="ops", kind="client", roles=("admin",), fingerprint="f")
DEV = Peer(name="dev", kind="client", roles=("backend_developer",), fingerprint="g")


@dataclass
class _DataDir:
    root: Path


@dataclass
class _Store:
    data_dir: _DataDir


@dataclass
class _Service:
    store: _Store
    name: str = "node1"
    extra_client_methods: dict[str, Any] = field(default_factory=dict)


class _Custody:
    def __init__(self) -> None:
        self.leader = True

    def require_leader_term(self) -> int:
        if not self.leader:
            raise Unavailable("node1 is not the leader; retry")
        return 7


def _restore(tmp_path: Path, max_bytes: int = 100) -> tuple[ClusterRestore, _Service, _Custody]:
    service = _Service(_Store(_DataDir(tmp_path)))
    custody = _Custody()
    restore = ClusterRestore(service, custody, max_bytes=max_bytes)  # type: ignore[arg-type]
    return restore, service, custody


async def _upload(restore: ClusterRestore, body: dict[str, Any], peer: Peer = ADMIN) -> Any:
    parsed = parse_request("restore.upload", body)
    return await restore._upload(peer, parsed.args)


async def test_chunks_append_in_order_and_a_resent_chunk_is_taken_once(tmp_path: Path) -> None:
    restore, service, _ = _restore(tmp_path)
    assert set(service.extra_client_methods) == {"restore.upload", "restore.apply"}
    first = await _upload(restore, {"upload_id": None, "offset": 0, "data": b"abc"})
    upload = first["upload_id"]
    assert first["size"] == 3
    again = await _upload(restore, {"upload_id": upload, "offset": 0, "data": b"abc"})
    assert again["size"] == 3  # a retried call: not appended twice
    more = await _upload(restore, {"upload_id": upload, "offset": 3, "data": b"defg"})
    assert more["size"] == 7
    assert (tmp_path / "restore" / f"{upload}.upload").read_bytes() == b"abcdefg"
    with pytest.raises(InvalidPayload) as raised:
        await _upload(restore, {"upload_id": upload, "offset": 9, "data": b"x"})
    assert raised.value.field == "offset"
    assert "holds 7 bytes" in raised.value.message


async def test_past_the_limit_the_upload_is_refused_and_kept_as_it_was(tmp_path: Path) -> None:
    restore, _, _ = _restore(tmp_path, max_bytes=10)
    upload = (await _upload(restore, {"upload_id": None, "offset": 0, "data": b"12345678"}))[
        "upload_id"
    ]
    with pytest.raises(InvalidPayload) as raised:
        await _upload(restore, {"upload_id": upload, "offset": 8, "data": b"abc"})
    assert raised.value.field == "data"
    assert "restore_max_bytes = 10" in raised.value.message
    assert (tmp_path / "restore" / f"{upload}.upload").read_bytes() == b"12345678"
    with pytest.raises(InvalidPayload):  # the limit counts every upload the leader keeps
        await _upload(restore, {"upload_id": None, "offset": 0, "data": b"abc"})


async def test_who_may_upload(tmp_path: Path) -> None:
    restore, _, custody = _restore(tmp_path)
    with pytest.raises(Forbidden):
        await _upload(restore, {"upload_id": None, "offset": 0, "data": b"a"}, DEV)
    with pytest.raises(NotFound) as raised:  # e.g. uploaded to a leader that stepped down
        await _upload(restore, {"upload_id": "ab" * 16, "offset": 0, "data": b"a"})
    assert raised.value.field == "upload_id"
    with pytest.raises(InvalidPayload) as bad:
        await _upload(restore, {"upload_id": None, "offset": 5, "data": b"a"})
    assert bad.value.field == "offset"
    custody.leader = False
    with pytest.raises(Unavailable):
        await _upload(restore, {"upload_id": None, "offset": 0, "data": b"a"})
    assert not (tmp_path / "restore").exists() or not any((tmp_path / "restore").iterdir())


@pytest.mark.parametrize(
    ("method", "body", "bad"),
    [("restore.upload", {"offset": 0, "data": "text"}, "data"),
     ("restore.upload", {"offset": 0, "data": b"x" * (MAX_RESTORE_CHUNK + 1)}, "data"),
     ("restore.upload", {"offset": -1, "data": b""}, "offset"),
     ("restore.upload", {"offset": True, "data": b""}, "offset"),
     ("restore.upload", {"upload_id": "../x", "offset": 0, "data": b""}, "upload_id"),
     ("restore.apply", {"uploads": []}, "uploads"),
     ("restore.apply", {"uploads": ["ABC"]}, "upload_id"),
     ("restore.apply", {"uploads": ["ab"], "cursor": -3}, "cursor")],
)  # fmt: skip
def test_bad_requests_name_the_field(method: str, body: dict[str, Any], bad: str) -> None:
    with pytest.raises(InvalidPayload) as raised:
        parse_request(method, body)
    assert raised.value.field == bad


def test_a_good_apply_request() -> None:
    parsed = parse_request("restore.apply", {"uploads": ["ab12", "cd34"], "cursor": 5})
    assert parsed.args == {"uploads": ["ab12", "cd34"], "cursor": 5}
    assert parse_request("restore.apply", {"uploads": ["ab"]}).args["cursor"] == 0
