"""The client SDK against a fake node (``tests/node/fake_node.py``) on both transports:
typed round trips, error classes by UCXL code, seed failover and the retry policy (reads
retried on the next seed, writes never once sent); then the blocking client from plain
code, and client profiles."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio
import trio.testing

from crypto.roles import DEFAULT_ROLES
from node.client import (
    Client,
    ClientConfig,
    Connector,
    PutItem,
    Seed,
    load_profile,
    open_client,
    storage_error,
)
from node.rpc.memory_transport import MemoryNetwork
from node.rpc.transport import Caller
from storage.context_store import ContextStore
from storage.errors import (
    Forbidden,
    InvalidAddress,
    InvalidPayload,
    NotFound,
    StorageError,
    TemporalOutOfRange,
    Unavailable,
)
from storage.views import StoredRef, VersionView
from tests.node.conftest import CLIENT_ROLES, Pki
from tests.node.fake_node import FakeNode, serving_in_thread

SEED = 20260315
DEV = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
OTHER = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/keys.py"
RECORD = {"summary": "JWT signing moves to Ed25519", "content": "sign(claims)", "tags": ["jwt"]}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ContextStore]:
    ContextStore.init(tmp_path / "store", DEFAULT_ROLES)
    with ContextStore.open(tmp_path / "store") as opened:
        yield opened


def closed_port() -> int:
    """A port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- harnesses: fake nodes on a transport, and a client config for them ------------------


class TlsCluster:
    """Fake nodes on 127.0.0.1 over mutual TLS; alice is the client."""

    def __init__(self, pki: Pki, nursery: trio.Nursery) -> None:
        self.pki = pki
        self.nursery = nursery
        self.connect: Connector | None = None

    async def start(self, node: FakeNode, seed: Seed | None = None) -> Seed:
        """Serve ``node``, at ``seed`` if given (a restart), else anywhere."""
        files = self.pki.files(node.name)
        port: int = await self.nursery.start(node.serve_tls, files, seed[1] if seed else 0)
        return ("127.0.0.1", port)

    def dead_seed(self) -> Seed:
        return ("127.0.0.1", closed_port())

    def config(self, *seeds: Seed, timeout_s: float = 5.0) -> ClientConfig:
        return ClientConfig(seeds=seeds, tls=self.pki.files("alice"), timeout_s=timeout_s)


class MemoryCluster(TlsCluster):
    """Fake nodes on a ``MemoryNetwork``; seeds are (node name, 1)."""

    def __init__(self, pki: Pki, nursery: trio.Nursery) -> None:
        super().__init__(pki, nursery)
        self.network = MemoryNetwork(random.Random(SEED))
        self.network.set_identity("alice", kind="client", roles=CLIENT_ROLES)
        self.connect = self._connect

    def _connect(self, seed: Seed) -> AbstractAsyncContextManager[Caller]:
        return self.network.open_client("alice", seed[0])

    async def start(self, node: FakeNode, seed: Seed | None = None) -> Seed:
        await self.nursery.start(node.serve_memory, self.network)
        return (node.name, 1)

    def dead_seed(self) -> Seed:
        return ("node-x", 1)


@pytest.fixture(params=["tls", "memory"])
def cluster(request: pytest.FixtureRequest, pki: Pki, nursery: trio.Nursery) -> TlsCluster:
    if request.param == "tls":
        return TlsCluster(pki, nursery)
    return MemoryCluster(pki, nursery)


# --- round trips ----------------------------------------------------------------------------


async def test_every_method_round_trips_typed_views(
    cluster: TlsCluster, store: ContextStore
) -> None:
    seed = await cluster.start(FakeNode(store))
    async with open_client(cluster.config(seed), connect=cluster.connect) as client:
        ref = await client.put(DEV, {**RECORD, "content": b"\x00\xff"}, readers=["observer"])
        assert isinstance(ref, StoredRef)
        assert ref.version == 1
        assert ref.address.endswith("/*~1/src/auth/jwt.py")
        refs = await client.put_batch([(DEV, RECORD), PutItem(OTHER, RECORD, readers=None)])
        assert [r.version for r in refs] == [2, 1]

        view = await client.get(ref.address)
        assert view == await trio.to_thread.run_sync(store.retrieve, ref.address)
        assert view.content == b"\x00\xff"
        assert view.readers == ("observer", "admin")
        assert isinstance(view.tags, tuple)
        latest = await client.get(DEV, as_role="backend_developer")
        assert (latest.version, latest.read_as) == (2, "backend_developer")
        wildcard = await client.get("ucxl://any:any@chorus:auth/*^/src/auth/keys.py")
        assert wildcard.address == refs[1].address

        batch = await client.get_batch([ref.address, "ucxl://a:observer@p:t/*^/missing"])
        assert batch[0] == view
        assert isinstance(batch[1], NotFound)

        history = await client.history(DEV)
        assert history == await trio.to_thread.run_sync(store.history, DEV)
        assert [(e.version, e.kind) for e in history] == [(1, "put"), (2, "put")]

        pattern = "ucxl://any:any@chorus:auth/*^"
        listing = await client.ls(pattern)
        assert listing == await trio.to_thread.run_sync(store.list_contexts, pattern)
        assert sorted(info.versions for info in listing) == [1, 2]

        hits = await client.search("Ed25519", project="chorus", tags=["jwt"], limit=5)
        assert {hit.context for hit in hits} == {info.context for info in listing}

        gone = await client.delete(OTHER)
        assert gone.version == 2
        assert len(await client.ls(pattern)) == 1
        assert len(await client.ls(pattern, deleted=True)) == 2
        assert await client.purge(OTHER) == 2

        status = await client.status()
        assert status["name"] == "node-a"
        assert status["quorum"] == {"n": 1, "w": 1, "r": 1}
        assert client.peer is not None
        assert client.peer.name == "node-a"


async def test_history_follows_more_until_the_whole_history_arrived(
    cluster: TlsCluster, store: ContextStore
) -> None:
    node = FakeNode(store)
    node.history_page = 2  # the node answers two entries at a time, then "more"
    seed = await cluster.start(node)
    async with open_client(cluster.config(seed), connect=cluster.connect) as client:
        for i in range(5):
            await client.put(DEV, {**RECORD, "summary": f"v{i}"})
        history = await client.history(DEV)
    assert [entry.version for entry in history] == [1, 2, 3, 4, 5]
    assert node.calls.count("ctx.history") == 3


async def test_error_answers_raise_the_storage_error_of_their_code(
    cluster: TlsCluster, store: ContextStore
) -> None:
    node = FakeNode(store)
    seed = await cluster.start(node)
    async with open_client(cluster.config(seed), connect=cluster.connect) as client:
        ref = await client.put(DEV, RECORD)
        with pytest.raises(NotFound) as missing:
            await client.get("ucxl://a:observer@p:t/*^/nothing")
        assert missing.value.code == "UCXL-404-NOT_FOUND"
        with pytest.raises(TemporalOutOfRange):
            await client.get(DEV.replace("/*^", "/*~9"))
        with pytest.raises(Forbidden):
            await client.get(ref.address, as_role="observer")
        with pytest.raises(InvalidAddress) as wildcard:  # parses here; the node refuses it
            await client.put("ucxl://any:backend_developer@chorus:auth/*^/x", RECORD)
        assert wildcard.value.field == "address"
        with pytest.raises(InvalidPayload) as role:
            await client.put(DEV, RECORD, readers=["nobody"])
        assert role.value.field == "roles"


async def test_malformed_arguments_never_leave_the_process(
    cluster: TlsCluster, store: ContextStore
) -> None:
    node = FakeNode(store)
    seed = await cluster.start(node)
    async with open_client(cluster.config(seed), connect=cluster.connect) as client:
        with pytest.raises(InvalidAddress) as bad:
            await client.get("ucxl://claude@chorus/*^")
        assert bad.value.field is not None
        with pytest.raises(InvalidPayload) as record:
            await client.put(DEV, {"summary": "x", "colour": "red"})
        assert record.value.field == "colour"
        with pytest.raises(InvalidAddress):
            await client.ls("not an address")
        with pytest.raises(InvalidAddress):
            await client.get_batch([DEV, "ucxl://x"])
    assert node.calls == []


def test_unknown_codes_keep_their_code() -> None:
    error = storage_error("UCXL-418-TEAPOT", "short and stout", "spout")
    assert type(error) is StorageError
    assert (error.code, error.status, error.field) == ("UCXL-418-TEAPOT", 418, "spout")
    assert type(storage_error("UCXL-503-UNAVAILABLE", "quorum")) is Unavailable
    assert storage_error("nonsense", "x").code == "UCXL-500-INTERNAL"


# --- failover and retries -------------------------------------------------------------------


async def test_a_dead_first_seed_is_skipped(cluster: TlsCluster, store: ContextStore) -> None:
    seed = await cluster.start(FakeNode(store))
    config = cluster.config(cluster.dead_seed(), seed)
    async with open_client(config, connect=cluster.connect) as client:
        ref = await client.put(DEV, RECORD)  # a write may move on: nothing was sent
        assert (await client.get(ref.address)).version == 1
        assert client.peer is not None
        assert client.peer.name == "node-a"


async def test_no_reachable_seed_raises_unavailable(cluster: TlsCluster) -> None:
    config = cluster.config(cluster.dead_seed(), cluster.dead_seed())
    with pytest.raises(Unavailable, match="no node answered"):
        async with open_client(config, connect=cluster.connect):
            pass  # pragma: no cover


async def test_a_read_moves_to_the_next_seed_when_the_first_dies_between_calls(
    cluster: TlsCluster, store: ContextStore
) -> None:
    a, b = FakeNode(store, "node-a"), FakeNode(store, "node-b")
    config = cluster.config(await cluster.start(a), await cluster.start(b))
    async with open_client(config, connect=cluster.connect) as client:
        ref = await client.put(DEV, RECORD)
        a.stop()
        await trio.sleep(0.01)
        assert (await client.get(ref.address)).version == 1
        assert b.calls == ["ctx.get"]
        assert client.peer is not None
        assert client.peer.name == "node-b"


async def test_a_restarted_single_node_is_reconnected_by_the_next_call(
    cluster: TlsCluster, store: ContextStore
) -> None:
    first = FakeNode(store)
    seed = await cluster.start(first)
    async with open_client(cluster.config(seed), connect=cluster.connect) as client:
        ref = await client.put(DEV, RECORD)
        first.stop()
        await trio.sleep(0.01)
        second = FakeNode(store)
        await cluster.start(second, seed)
        assert (await client.get(ref.address)).version == 1
        assert second.calls == ["ctx.get"]


async def test_a_read_is_retried_on_the_next_seed_when_its_node_dies_mid_call(
    cluster: TlsCluster, store: ContextStore
) -> None:
    a, b = FakeNode(store, "node-a"), FakeNode(store, "node-b")
    config = cluster.config(await cluster.start(a), await cluster.start(b))
    async with open_client(config, connect=cluster.connect) as client:
        ref = await client.put(DEV, RECORD)
        a.crash_on.add("ctx.history")
        assert len(await client.history(ref.address)) == 1
    assert a.calls == ["ctx.put", "ctx.history"]
    assert b.calls == ["ctx.history"]


async def test_concurrent_reads_all_fail_over_together(
    cluster: TlsCluster, store: ContextStore
) -> None:
    a, b = FakeNode(store, "node-a"), FakeNode(store, "node-b")
    config = cluster.config(await cluster.start(a), await cluster.start(b))
    async with open_client(config, connect=cluster.connect) as client:
        ref = await client.put(DEV, RECORD)
        a.hang_on.add("ctx.get")
        versions: list[int] = []

        async def read() -> None:
            versions.append((await client.get(ref.address)).version)

        async with trio.open_nursery() as readers:
            for _ in range(8):
                readers.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            a.stop()  # the eight calls in flight on node-a lose their connection
        assert versions == [1] * 8
        assert b.calls == ["ctx.get"] * 8
        assert (await client.history(DEV))[0].version == 1
    assert b.calls[-1] == "ctx.history"


async def test_a_write_is_not_retried_once_sent(cluster: TlsCluster, store: ContextStore) -> None:
    a, b = FakeNode(store, "node-a"), FakeNode(store, "node-b")
    a.crash_on.add("ctx.put")
    config = cluster.config(await cluster.start(a), await cluster.start(b))
    async with open_client(config, connect=cluster.connect) as client:
        with pytest.raises(Unavailable, match="may or may not have taken effect"):
            await client.put(DEV, RECORD)
        assert a.calls == ["ctx.put"]
        assert b.calls == []
        with pytest.raises(NotFound):  # the next call reconnects, to node-b
            await client.get(DEV)
        assert b.calls == ["ctx.get"]


async def test_a_write_without_an_answer_is_not_retried(
    cluster: TlsCluster, store: ContextStore
) -> None:
    a, b = FakeNode(store, "node-a"), FakeNode(store, "node-b")
    a.hang_on.add("ctx.delete")
    config = cluster.config(await cluster.start(a), await cluster.start(b), timeout_s=0.1)
    async with open_client(config, connect=cluster.connect) as client:
        with pytest.raises(Unavailable, match="no answer"):
            await client.delete(DEV)
    assert b.calls == []


# --- the blocking client -------------------------------------------------------------------


def test_the_blocking_client_works_from_plain_code(pki: Pki, store: ContextStore) -> None:
    alice = pki.files("alice")
    with serving_in_thread(FakeNode(store), pki.files("node-a")) as port:
        client = Client.connect(
            [f"127.0.0.1:{closed_port()}", f"127.0.0.1:{port}"],
            cert=alice.cert,
            key=alice.key,
            ca=alice.ca_cert,
        )
        with client:
            ref = client.put(DEV, RECORD)
            view = client.get(ref.address)
            assert isinstance(view, VersionView)
            assert view.summary == RECORD["summary"]
            assert [e.version for e in client.history(DEV)] == [1]
            assert [info.context for info in client.ls(DEV)] == [view.context]
            assert [hit.version for hit in client.search("Ed25519")] == [1]
            assert isinstance(client.get_batch(["ucxl://a:observer@p:t/*^"])[0], NotFound)
            with pytest.raises(NotFound):
                client.get("ucxl://a:observer@p:t/*^")
            assert client.status()["name"] == "node-a"
            assert client.delete(DEV).version == 2
            assert client.purge(DEV) == 2
        with pytest.raises(trio.ClosedResourceError):
            client.get(DEV)
        client.close()  # idempotent


def test_the_blocking_client_reports_an_unreachable_cluster(pki: Pki) -> None:
    alice = pki.files("alice")
    with pytest.raises(Unavailable):
        Client.connect([("127.0.0.1", closed_port())], alice.cert, alice.key, alice.ca_cert)


# --- profiles ------------------------------------------------------------------------------


def write_profile(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_a_profile_configures_the_blocking_client(
    pki: Pki, store: ContextStore, tmp_path: Path
) -> None:
    with serving_in_thread(FakeNode(store), pki.files("node-a")) as port:
        profile = write_profile(
            pki.ca.directory / "client.toml",
            f'seeds = ["127.0.0.1:{port}"]\ntimeout_s = 2.5\n'
            '[tls]\nca = "ca.crt"\ncert = "alice.crt"\nkey = "alice.key"\n',
        )
        config = load_profile(profile)
        assert config.seeds == (("127.0.0.1", port),)
        assert config.timeout_s == 2.5
        assert config.tls == pki.files("alice")  # relative paths; ca.crl found beside ca
        with Client.from_profile(profile) as client:
            assert client.put(DEV, RECORD).version == 1


TLS = "[tls]\nca = 'ca.crt'\ncert = 'alice.crt'\nkey = 'alice.key'\n"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (TLS, "seeds"),
        ("seeds = []\n" + TLS, "seeds"),
        ("seeds = ['localhost']\n" + TLS, "seeds"),
        ("seeds = ['h:1']\n", "tls"),
        ("seeds = ['h:1']\n" + TLS.replace("key = 'alice.key'\n", ""), "tls.key"),
        ("seeds = ['h:1']\n" + TLS.replace("'alice.crt'", "'bob.crt'"), "tls.cert"),
        ("seeds = ['h:1']\n" + TLS + "color = 1\n", "tls.color"),
        ("seeds = ['h:1']\nseed = 'x'\n" + TLS, "seed"),
        ("seeds = ['h:1']\ntimeout_s = 0\n" + TLS, "timeout_s"),
        ("seeds = [", "profile"),
    ],
)
def test_profile_errors_name_the_key(pki: Pki, text: str, field: str) -> None:
    profile = write_profile(pki.ca.directory / "client.toml", text)
    with pytest.raises(InvalidPayload) as error:
        load_profile(profile)
    assert error.value.field == field


def test_a_missing_profile_is_named(tmp_path: Path) -> None:
    with pytest.raises(InvalidPayload) as error:
        load_profile(tmp_path / "absent.toml")
    assert error.value.field == "profile"
