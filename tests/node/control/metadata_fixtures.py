"""A small cluster-metadata state shared by the node.control tests."""

from __future__ import annotations

from node.control.metadata import ClusterMetadata, Custody, KeyEpoch, Member, bootstrap_state

IDS = ("id-a", "id-b", "id-c")


def three_members() -> list[Member]:
    """Three normal members node1..node3 with ids id-a..id-c."""
    return [
        Member(node_id, f"node{i}", "normal", f"age1node{i}", "127.0.0.1", 7000 + i)
        for i, node_id in enumerate(IDS, start=1)
    ]


def three_node_state() -> ClusterMetadata:
    """A bootstrapped 3-node state (custody 2 of 3, two roles, the default duties)."""
    return bootstrap_state(
        "c0ffee",
        three_members(),
        Custody(2, 3, "age1admin", {IDS[0]: 1, IDS[1]: 2, IDS[2]: 3}),
        {"admin": KeyEpoch(1, "age1admin", 5), "observer": KeyEpoch(1, "age1obs", 5)},
    )
