"""Membership changes through the control log: the operator's methods and the leader's
transition driver (a trio shell).

Owns:
- ``ctl.member_add`` / ``ctl.member_remove`` / ``ctl.member_forget`` (client
  certificates with the ``admin`` role only; docs/cluster.md). The leader answers them;
  a follower forwards the request to the leader it knows as ``ctl.member {method, body,
  client_name}`` (node certificates only; the leader never forwards it again). ``add``
  commits ``member_add`` (state "joining") and then the Raft change adding the node as a
  learner; ``remove`` commits "leaving"; ``forget`` (a dead node: refused if it answers
  ``rep.ping``) commits "removed" and then drops it from the Raft configuration.
- The transition driver: while ``control.leader_term()`` holds, it asks
  ``node.control.membership_plan.next_step`` for the next step and carries it out (one
  conf change at a time, each waited for until it applied; state steps through the
  log), every ``interval_s`` or when woken. A new leader resumes from the metadata and
  the configuration alone.
- ``member_state`` in ``node.status``: this node's own member state (None: unknown).

``streamed``: the data plane records, per node, the ring epoch it last streamed
everything for (``ClusterMetadata.streamed``, issue 9's data plane). When the metadata has
no such record (a build without the data plane), the driver takes every member as having
streamed: membership changes then complete at once and anti-entropy moves the data.

Must not know: Raft's rules (the core checks each change), how ranges stream, the
decisions (``membership_plan``).

Invariants: the driver acts only under a leader term it checked just before; a step that
fails (a lost leadership, an uncommitted conf entry) is simply asked for again later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import trio

from crypto.roles import ADMIN_ROLE
from node.cluster.requests import MEMBER_METHODS
from node.cluster.service import NodeService
from node.control import metadata
from node.control.membership_plan import (
    add_refusal,
    forget_refusal,
    member_state,
    next_step,
    remove_refusal,
)
from node.control.metadata import ClusterMetadata, Member
from node.control.raft_types import ConfState
from node.control.service import ControlService
from node.errors import NodeError
from node.rpc.transport import Peer
from storage.errors import Forbidden, InvalidPayload, StorageError, Unavailable

log = logging.getLogger(__name__)
Body = dict[str, Any]
StreamedOf = Callable[[ClusterMetadata], Mapping[str, int] | None]
PING_TIMEOUT_S = 2.0


def streamed_in_metadata(state: ClusterMetadata) -> Mapping[str, int] | None:
    """The data plane's ``streamed`` record of ``state`` (None: this build has none)."""
    streamed = getattr(state, "streamed", None)
    return streamed if isinstance(streamed, Mapping) else None


class Transitions:
    """The membership methods and the transition driver of one node."""

    def __init__(
        self,
        control: ControlService,
        *,
        interval_s: float = 0.5,
        streamed_of: StreamedOf = streamed_in_metadata,
        is_live: Callable[[str], bool] | None = None,
    ) -> None:
        self.control = control
        self.service: NodeService = control.service
        self.interval_s = interval_s
        self.streamed_of = streamed_of
        self.is_live = is_live or self.service.cluster.is_up
        self.steps = 0  # steps carried out (metrics, tests)
        self.last_step: str | None = None
        self._wake = trio.Event()
        for method in MEMBER_METHODS:
            self.service.extra_client_methods[method] = partial(self.run_method, method=method)
        self.service.extra_replica_methods["ctl.member"] = self._forwarded
        self.service.status_fields.append(self.status)
        control.on_change.append(self.wake)
        control.on_apply.append(lambda _entry: self.wake())

    def status(self) -> Body:
        """``member_state``: this node's member state in the applied metadata;
        ``member_states``: name -> state of every member (a removed one while its name is
        not reused); ``transition``: the driver's last step (None: none yet)."""
        state = self.control.metadata
        states: dict[str, str] = {}
        if state is not None:
            for member in sorted(state.members.values(), key=lambda m: m.state != "removed"):
                states[member.name] = member.state  # the member not removed wins a name
        return {
            "member_state": member_state(state, self.control.node_id),
            "member_states": states,
            "transition": self.last_step,
        }

    def wake(self) -> None:
        """Run the driver soon (a leadership change, an applied entry)."""
        self._wake.set()

    # -- the driver ---------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drive transitions while this node leads, until cancelled."""
        task_status.started()
        while True:
            with trio.move_on_after(self.interval_s):
                await self._wake.wait()
            self._wake = trio.Event()
            try:
                while await self.drive_once():
                    pass
            except (StorageError, NodeError) as exc:
                log.info("membership step not taken: %s", exc)
            except ValueError as exc:  # the core refused a conf change: the plan is stale
                log.info("membership conf change refused: %s", exc)

    async def drive_once(self) -> bool:
        """Take the next step if this node leads; whether one was taken."""
        term = self.control.leader_term()
        state = self.control.metadata
        if term is None or state is None:
            return False
        streamed = self.streamed_of(state)
        if streamed is None:  # no data plane record: nothing to wait for
            streamed = {node_id: state.ring.epoch for node_id in state.members}
        live = {
            node_id for node_id, member in state.members.items()
            if node_id == self.control.node_id or self.is_live(member.name)
        }  # fmt: skip
        step = next_step(
            state, self.control.conf(), leader=self.control.node_id,
            match=self.control.match_indexes(), commit_index=self.control.commit_index(),
            streamed=streamed, live=live,
        )  # fmt: skip
        if step is None or self.control.leader_term() != term:
            return False
        log.info("membership: %s %s (%s)", step.kind, step.node_id, step.why)
        if step.conf is not None:
            await self.control.propose_conf_change(step.conf)  # Unavailable: retried later
        else:
            assert step.state is not None
            result = await self.control.propose(metadata.cmd_member_state(step.node_id, step.state))
            if not result.ok:
                log.info("membership state step refused: %s", result.error)
                return False
        self.steps += 1
        self.last_step = f"{step.kind} {step.node_id}: {step.why}"
        return True

    # -- the operator's methods ---------------------------------------------------------

    async def _forwarded(self, peer: Peer, args: Body) -> Body:
        """``ctl.member {method, body, client_name}`` from a follower: run it here."""
        if peer.kind != "node":
            raise Forbidden("ctl.member is for cluster nodes only")
        if self.control.leader_term() is None:
            raise Unavailable(
                f"{self.service.name} is not the leader (the leader I know: "
                f"{self.control.leader_name() or 'none'}); retry"
            )
        return await self._run(args["method"], args["request"])

    async def run_method(self, peer: Peer, args: Body, *, method: str) -> Body:
        """A client's ``ctl.member_*``: here when leading, else forwarded to the leader
        (the parsed arguments have the request's own shape, so they travel as its body)."""
        if peer.kind != "client" or ADMIN_ROLE not in peer.roles:
            raise Forbidden(f"{method} needs a client certificate with the admin role")
        if self.control.leader_term() is not None:
            return await self._run(method, args)
        leader = self.control.leader_name()
        if leader is None or leader == self.service.name:
            raise Unavailable("no control-plane leader is known (or its lease lapsed); retry")
        body = {"method": method, "body": args, "client_name": peer.name}
        return await self.service.dialer.call(
            leader, "ctl.member", body, timeout_s=self.control.config.propose_timeout_s * 3
        )

    async def _run(self, method: str, args: Body) -> Body:
        state = self.control.metadata
        if state is None:
            raise Unavailable("the cluster metadata is not applied here yet; retry")
        if method == "ctl.member_add":
            answer = await self._add(state, args)
        elif method == "ctl.member_remove":
            answer = await self._remove(state, args["name"])
        else:
            answer = await self._forget(state, args["name"])
        self.wake()
        return answer

    async def _commit(self, command: bytes) -> None:
        result = await self.control.propose(command)
        if not result.ok:
            raise InvalidPayload(f"the cluster metadata refused it: {result.error}", field="name")

    async def _add(self, state: ClusterMetadata, args: Body) -> Body:
        why = add_refusal(state, args["name"], args["node_id"])
        if why is not None:
            raise InvalidPayload(why, field="name")
        member = Member(
            args["node_id"], args["name"], "joining", args["recipient"], args["rpc_host"],
            args["rpc_port"], signing_key=args["signing_key"],
        )  # fmt: skip
        await self._commit(metadata.cmd_member_add(member))
        await self._try_conf(lambda conf: ConfState(conf.voters, conf.learners | {member.node_id}))
        return self._answer(member.node_id)

    async def _remove(self, state: ClusterMetadata, name: str) -> Body:
        why = remove_refusal(state, name)
        if why is not None:
            raise InvalidPayload(why, field="name")
        member = state.member_by_name(name)
        assert member is not None
        await self._commit(metadata.cmd_member_state(member.node_id, "leaving"))
        return self._answer(member.node_id)

    async def _forget(self, state: ClusterMetadata, name: str) -> Body:
        member = state.member_by_name(name)
        answers = member is not None and name != self.service.name and await self._answers(name)
        why = forget_refusal(state, name, answers=answers or name == self.service.name)
        if why is not None:
            raise InvalidPayload(why, field="name")
        assert member is not None
        await self._commit(metadata.cmd_member_state(member.node_id, "removed"))
        node_id = member.node_id
        await self._try_conf(lambda c: ConfState(c.voters - {node_id}, c.learners - {node_id}))
        return self._answer(node_id)

    async def _answers(self, name: str) -> bool:
        try:
            await self.service.dialer.call(name, "rep.ping", {}, timeout_s=PING_TIMEOUT_S)
        except (StorageError, NodeError):
            return False
        return True

    async def _try_conf(self, change: Callable[[ConfState], ConfState]) -> None:
        """Propose a conf change now if possible; else the driver does it later."""
        conf = self.control.conf()
        new = change(conf)
        if new == conf:
            return
        try:
            await self.control.propose_conf_change(new)
        except (ValueError, StorageError) as exc:
            log.info("conf change left to the membership driver: %s", exc)

    def _answer(self, node_id: str) -> Body:
        state = self.control.metadata
        assert state is not None
        member = state.members[node_id]
        return {"name": member.name, "node_id": node_id, "state": member.state,
                "ring_epoch": state.ring.epoch}  # fmt: skip
