"""Writes in flight per layout epoch: what ``epoch_seen`` waits for (a pure core).

Owns: the count of the writes this node coordinates, by the ring epoch of the layout
each was routed by (``begin`` -> token, ``end``), and whether none routed by a layout
older than some epoch is still in flight (``drained_below``). Garage's "ack" tracker
(research/self-healing.md, §4): a node acknowledges a new layout version only once the
writes it started under older versions finished.

Must not know: trio, RPC, storage, the metadata log. The node service begins a token
immediately before it places a write (puts, deletes, purges: the same epoch it places
by) and ends it once every replica attempt of that write finished (acknowledged, failed
or timed out; hint stores for missed owners are part of their attempt); range streaming
(``node.cluster.rebalance``) proposes ``epoch_seen(E)`` only once ``drained_below(E)``,
or after its bound (a stuck write has the request deadline; past it, it failed).

Invariants:
- every token is ended at most once; ending an unknown token is a bug (ValueError);
- ``drained_below(E)`` is true exactly when no begun, unended token has an epoch < E;
- nothing here waits or reads a clock: the shell waits (``changes`` counts ``end`` calls
  so a waiter can tell that something ended).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class WriteToken:
    """One write in flight: its serial number and the epoch it was routed by."""

    serial: int
    epoch: int


@dataclass
class InflightWrites:
    """The writes in flight on one coordinator, counted per layout epoch."""

    _open: dict[int, int] = field(default_factory=dict)  # serial -> epoch
    _by_epoch: Counter[int] = field(default_factory=Counter)
    _next: int = 0
    changes: int = 0  # ``end`` calls so far

    def begin(self, epoch: int) -> WriteToken:
        """A write routed by the layout of ``epoch`` starts now."""
        token = WriteToken(self._next, epoch)
        self._next += 1
        self._open[token.serial] = epoch
        self._by_epoch[epoch] += 1
        return token

    def end(self, token: WriteToken) -> None:
        """The write of ``token`` finished (acknowledged or failed).

        Raises:
            ValueError: the token is unknown or already ended.
        """
        epoch = self._open.pop(token.serial, None)
        if epoch is None:
            raise ValueError(f"write token {token.serial} is not in flight")
        self._by_epoch[epoch] -= 1
        if not self._by_epoch[epoch]:
            del self._by_epoch[epoch]
        self.changes += 1

    def drained_below(self, epoch: int) -> bool:
        """Whether no write routed by a layout older than ``epoch`` is in flight."""
        return all(e >= epoch for e in self._by_epoch)

    def in_flight(self, below: int | None = None) -> int:
        """How many writes are in flight (those routed by an epoch < ``below``)."""
        return sum(n for e, n in self._by_epoch.items() if below is None or e < below)
