"""The RPC methods a node serves: names and body shapes (protocol version 1).

Owns the contract between the client SDK (``node/client/__init__.py``), the node service
(``node/cluster/service.py``) and replicas. Bodies are msgpack maps; views travel in their
``storage.views.to_wire`` form (raw milliseconds, bytes kept as bytes). Errors travel as
``error`` frames carrying the UCXL code (``node/rpc/wire.py``).

Client methods (any authenticated client; roles come from its certificate), as
``method: request body -> response body``:

- ``ctx.put``: {address, record: {fields}, readers: [role]|None, w: int|None} -> {ref}
- ``ctx.put_batch``: {items: [{address, record, readers}], w} -> {refs: [ref]}
- ``ctx.get``: {address, as_role: str|None, r: int|None} -> {version}
- ``ctx.get_batch``: {addresses, as_role, r} -> {results: [{version} | {error}], more: bool}
  (``more``: the answer stopped at ``MAX_BATCH_BYTES``; ask again for the rest)
- ``ctx.history``: {address, r, from: int|None} -> {history: [entry], more: bool}
  (entries from index ``from``, oldest first, while they fit ``MAX_BATCH_BYTES``)
- ``ctx.ls``: {pattern, deleted: bool} -> {contexts: [info]}
- ``ctx.search``: {query, project, task, tags, limit, as_role} -> {hits: [hit]}
- ``ctx.delete``: {address, w} -> {ref}
- ``ctx.purge``: {address} -> {versions: int}
- ``node.status``: {} -> {name, node_id, members: [...], ring: {...}, quorum: {n, w, r},
  role: "leader"|"follower"|"candidate"|None, term, leader: name|None, admin_key_held,
  admin_custody: {epoch, threshold, holders, holder, last_reshare}|None,
  raft: {node_id, commit_index, applied_index, lease, elections, halted, voters,
  ring_epoch, warnings}, member_state: "joining"|"normal"|"leaving"|"removed"|None, ...}
  (docs/control.md)

Operator methods (client certificates with the ``admin`` role; answered by the leader, a
follower forwards them as ``ctl.member``; refusals answer ``UCXL-400-INVALID_PAYLOAD``
with field ``name``; docs/cluster.md):

- ``ctl.member_add``: {name, node_id, recipient: "age1...", signing_key: bytes (raw
  Ed25519, 32), rpc_host, rpc_port} -> {name, node_id, state: "joining", ring_epoch}
  (commits the member, then the Raft change adding it as a learner)
- ``ctl.member_remove``: {name} -> {name, node_id, state: "leaving", ring_epoch}
- ``ctl.member_forget``: {name} -> {name, node_id, state: "removed", ring_epoch}
  (refused while the node answers ``rep.ping``, or when it holds an admin share the
  threshold still needs)

(ref = StoredRef, version = VersionView, entry = HistoryEntry, info = ContextInfo,
hit = SearchResult, error = {code, message, field}.)

Replica methods (node certificates only):

- ``rep.store``: {envelopes: [bytes]} -> {stored: [bool|None], heads: {context: count},
  latest: {context: id}, purged: {context: upto}} (senders split versions with
  ``batches_by_bytes(blobs, MAX_BATCH_BYTES)``; ``stored`` None: refused; ``latest``: the
  newest version id held per context written; ``purged``, only when a version was refused
  because the replica's purge marker covers it: that marker's ``upto``. ``latest`` and
  ``purged`` are additions: older nodes neither send nor read them)
- ``rep.head``: {context} -> {latest: id|None}
- ``rep.versions``: {context, after: id|None, max_bytes: int|None} -> {envelopes: [[id,
  bytes]], purge: bytes|None, more: bool} (one page, ids after ``after``, <= MAX_BATCH_BYTES)
- ``rep.purge``: {context, marker: bytes, term: int|None} -> {removed: int} (``term``: the
  purging leader's, checked against the replica's fence; absent: a repair, not fenced)
- ``rep.heads``: {pattern, deleted} -> {contexts: [info]}
- ``rep.search``: {query, project, task, tags, limit, as_role} -> {hits: [hit]}
- ``rep.ping``: {} -> {name}

Control-plane methods (node certificates only; docs/control.md):

- ``raft.msg``: {msgs: [message]} -> {stepped: int} (``node.control.raft_types`` wire
  form; a message is stepped only if addressed to this node and its sender id is the
  caller's member id)
- ``raft.propose``: {data: bytes} -> {ok, error, value, index} (to the leader)
- ``admin.share``: {term, recipient: "age1...", epoch?} -> {share: bytes, epoch} (to the
  leader of ``term`` only: the holder's Shamir share of the custody epoch it applied,
  age-encrypted to ``recipient``; ``epoch`` given and not that one: UCXL-503, retry)
- ``admin.reshare``: {term, epoch, share: bytes} -> {epoch} (from the leader of ``term``
  only: this member's share of the new custody ``epoch``, age-encrypted to its node
  recipient, above the committed epoch; answered once written durably)
- ``admin.forward``: {method, body, client: {name, roles}} -> the inner method's answer
  (to the leader, which runs it as that client if it holds the admin identity)
- ``ctl.maintain``: {duty: "ttl_sweep"|"compaction", term} -> {removed: int} (a leader
  duty on this member's store; a term below the member's fence is refused)
- ``ctl.member``: {method: "ctl.member_add"|..., body, client_name} -> the inner answer
  (a follower forwards an admin client's membership request to the leader, which runs it
  and never forwards it again)
- ``keys.install``: {term, role, version, identity: bytes} -> {version} (the leader's new
  role identity, age-encrypted to this member's node recipient; installed as the role's
  current key version; idempotent; fenced)
- ``keys.reseal``: {term, role, version} -> {role, to_version, done, scanned, total,
  rewritten, skipped} (re-encrypt a bounded batch of this member's rows the role reads;
  resumable; fenced)
- ``keys.retire``: {term, role, version} -> {retired: bool} (delete the old identity;
  idempotent; fenced)
- ``keys.rotate_leader``: {role} -> as ``keys.rotate`` (a follower hands it to the leader)

Cluster backups (node/control/cluster_backup.py; docs/backup.md, "Cluster backups"):

- ``backup.create``: {recipients: ["age1..."], with_keys: bool, since?: cut, since_cluster?:
  cluster id} -> {name, bytes, sha256, seconds, leader, manifest: {...}} (needs ``admin``;
  the leader takes a backup into its ``[backup] dir``: full, or with ``since`` an
  incremental continuing that cut; a malformed ``since``, another cluster's
  ``since_cluster`` or a ``since`` not before the leader's cut: 400, field ``since``; a
  follower hands it to the leader as ``backup.create_leader``, node certificates only)
- ``backup.read``: {name, offset, node?} -> {data: bytes (<= 4 MiB), eof: bool} (needs
  ``admin``; a page of backup ``name`` on ``node``, ``backup.create``'s ``leader``, or on
  the current leader when absent; any other node reads it there with
  ``backup.read_leader``; a name that is not a bare backup file name: 400, field ``name``)

Client method ``keys.rotate``: {role} -> {role, duty, started, term?} (needs ``admin``;
starts the cluster-wide rotation on the leader; follow it in ``node.status``'s
``rotation``: {role, version, phase, members_done, members_total, rows_done,
rows_total} while it runs, then {role, phase: "done"|"failed", message, finished_ms}).

Client methods ``restore.upload`` and ``restore.apply`` (need ``admin``; leader-only, a
follower forwards them through ``admin.forward``; node/control/cluster_restore.py,
docs/backup.md):

- ``restore.upload``: {upload_id: str|None, offset: int, data: bytes (<= 4 MiB)} ->
  {upload_id, size} (a new upload starts at offset 0 without an id; refused past
  ``[backup] restore_max_bytes`` on the leader)
- ``restore.apply``: {uploads: [upload_id] (a full backup, then its incrementals), cursor:
  int} -> {phase: "verifying", cursor, done: false} while the leader verifies, then
  {phase: "merging", cursor, units, done, total_versions, cut, counts: {versions_sent,
  already_held, purged, purges_applied, purges_held}} (one bounded step; call again from
  ``cursor`` until ``done``; the counts are the step's)

Authorization: a client may write a context whose role is one of its certificate roles
(or any context, with ``admin``); it may read as one of its roles only; ``ctx.purge``
needs ``admin``. Violations answer ``UCXL-403-FORBIDDEN``.
"""

from __future__ import annotations

CLIENT_METHODS = frozenset(
    {
        "ctx.put", "ctx.put_batch", "ctx.get", "ctx.get_batch", "ctx.history", "ctx.ls",
        "ctx.search", "ctx.delete", "ctx.purge", "node.status", "ctl.member_add",
        "ctl.member_remove", "ctl.member_forget",
    }
)  # fmt: skip
REPLICA_METHODS = frozenset(
    {"rep.store", "rep.versions", "rep.purge", "rep.heads", "rep.search", "rep.ping"}
)
DEFAULT_TIMEOUT_S = 5.0
