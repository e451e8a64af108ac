"""Simulation tier: replicas holding different seal epochs of one version converge.

One node re-seals its copies (a rotation walk on it alone, ``storage.rotation``); the
others still hold the copies as written. Invariants: anti-entropy alone (no reads) brings
every replica to the re-sealed copy, byte for byte, and the trees then agree; a read
through a node that holds the older copy answers with the re-seal (the merge prefers the
higher seal epoch) and read repair replaces the older copies; nothing ever goes back to a
lower seal epoch.
"""

from __future__ import annotations

from pathlib import Path

import pyrage
import trio
import trio.testing
from pyrage import x25519

from crypto.seal_format import age_file_of
from node.cluster.antientropy import HashTree
from node.cluster.antientropy_service import AntiEntropyConfig
from node.cluster.handoff_plan import HandoffConfig
from storage.address import ContextName, parse
from storage.envelope import Envelope
from storage.rotation import reseal_context
from tests.sim.harness import SimCluster, open_sim_cluster

ROLE = "backend_developer"
QUIET = AntiEntropyConfig(interval_s=10_000.0)  # passes only when the test runs them
NO_HANDOFF = HandoffConfig(enabled=False)
COUNT = 6


def address(i: int) -> str:
    return f"ucxl://agent{i % 3}:backend_developer@sim:reseal/*^/doc{i}.md"


def ctx_of(i: int) -> ContextName:
    return parse(address(i)).context()


def copies(sim: SimCluster, i: int) -> dict[str, dict[str, bytes]]:
    """node -> version id -> stored envelope bytes of context ``i``."""
    return {
        name: {row.version_id: row.data for row in node.store.versions.versions(ctx_of(i))}
        for name, node in sim.nodes.items()
    }


async def write_and_reseal_on_n1(sim: SimCluster) -> x25519.Identity:
    for i in range(COUNT):
        body = {"address": address(i), "record": {"summary": f"doc {i}"}, "w": 3}
        await sim.call("n1", "ctx.put", body)
    identity = x25519.Identity.generate()
    store = sim.nodes["n1"].store
    store.keyring.install_rotation(ROLE, identity, 2)
    for i in range(COUNT):
        rewritten, skipped = reseal_context(store, ctx_of(i), ROLE, 2, trusted=store.reader.trusted)
        assert (rewritten, skipped) == (1, 0)
    return identity


def assert_resealed_everywhere(sim: SimCluster, identity: x25519.Identity) -> None:
    for i in range(COUNT):
        held = copies(sim, i)
        assert held["n2"] == held["n1"] == held["n3"], f"context {i} differs"
        for data in held["n1"].values():
            env = Envelope.decode(data)
            assert env.seal_epoch > 0
            pyrage.decrypt(age_file_of(env.ciphertext), [identity])  # opens with the new key


def trees_agree(sim: SimCluster) -> bool:
    trees = [node.antientropy.keeper.tree for node in sim.nodes.values()]
    for node, tree in zip(sim.nodes.values(), trees, strict=True):
        rows = list(node.store.versions.version_states())
        rebuilt = HashTree.rebuilt(
            tree.partitions, tree.leaves, [(c, i, u) for c, i, u, _ in rows],
            {c: e for c, _, _, e in rows},
        )  # fmt: skip
        assert tree == rebuilt, node.name
    return all(dict(t.nonzero_roots()) == dict(trees[0].nonzero_roots()) for t in trees)


async def test_antientropy_brings_the_reseal_to_every_replica(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, antientropy=QUIET, handoff=NO_HANDOFF) as sim:
        identity = await write_and_reseal_on_n1(sim)
        assert not trees_agree(sim)  # the re-seal is a difference the trees see
        old = copies(sim, 0)
        assert old["n2"] != old["n1"]
        repaired = sim.nodes["n2"].antientropy.stats.versions_repaired
        await sim.nodes["n2"].antientropy.run_pass()  # pulls from n1, then pushes to n3
        assert sim.nodes["n2"].antientropy.stats.versions_repaired - repaired == 2 * COUNT
        assert_resealed_everywhere(sim, identity)
        assert trees_agree(sim)
        for node in sim.nodes.values():  # nothing left to do anywhere
            before = node.antientropy.stats.versions_repaired
            await node.antientropy.run_pass()
            assert node.antientropy.stats.versions_repaired == before
        assert_resealed_everywhere(sim, identity)


async def test_a_read_answers_with_the_reseal_and_repairs_the_older_copies(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_sim_cluster(tmp_path, antientropy=QUIET, handoff=NO_HANDOFF) as sim:
        identity = await write_and_reseal_on_n1(sim)
        for i in range(COUNT):
            await sim.call("n2", "ctx.get", {"address": address(i), "r": 3})
        await trio.sleep(2)  # the background read repair
        assert_resealed_everywhere(sim, identity)
        assert trees_agree(sim)
