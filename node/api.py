"""The RPC methods a node serves: names and body shapes (protocol version 1).

Owns the contract between the client SDK (``node/client.py``), the node service
(``node/service.py``) and replicas. Bodies are msgpack maps; views travel in their
``storage.views.to_wire`` form (raw milliseconds, bytes kept as bytes). Errors travel as
``error`` frames carrying the UCXL code (``node/wire.py``).

Client methods (any authenticated client; roles come from its certificate):

==================  ==========================================================  =========================
method              request body                                                response body
==================  ==========================================================  =========================
``ctx.put``         {address, record: {fields}, readers: [role]|None, w: int|None}  {ref: StoredRef}
``ctx.put_batch``   {items: [{address, record, readers}], w}                    {refs: [StoredRef]}
``ctx.get``         {address, as_role: str|None, r: int|None}                   {version: VersionView}
``ctx.get_batch``   {addresses: [str], as_role, r}                              {results: [{version}|{error: {code, message, field}}]}
``ctx.history``     {address, r}                                                {history: [HistoryEntry]}
``ctx.ls``          {pattern, deleted: bool}                                    {contexts: [ContextInfo]}
``ctx.search``      {query, project, task, tags: [str], limit, as_role}         {hits: [SearchResult]}
``ctx.delete``      {address, w}                                                {ref: StoredRef}
``ctx.purge``       {address}                                                   {versions: int}
``node.status``     {}                                                          {name, node_id, members: [...], ring: {...}, quorum: {n, w, r}}
==================  ==========================================================  =========================

Replica methods (node certificates only):

==================  ==========================================================  =========================
``rep.store``       {envelopes: [bytes]}                                        {stored: [bool], heads: {context: count}}
``rep.versions``    {context}                                                   {envelopes: [bytes], purge: bytes|None}
``rep.purge``       {context, marker: bytes}                                    {removed: int}
``rep.heads``       {pattern, deleted}                                          {contexts: [ContextInfo]}
``rep.search``      {query, project, task, tags, limit, as_role}                {hits: [SearchResult]}
``rep.ping``        {}                                                          {name}
==================  ==========================================================  =========================

Authorization: a client may write a context whose role is one of its certificate roles
(or any context, with ``admin``); it may read as one of its roles only; ``ctx.purge``
needs ``admin``. Violations answer ``UCXL-403-FORBIDDEN``.
"""

from __future__ import annotations

CLIENT_METHODS = frozenset(
    {
        "ctx.put", "ctx.put_batch", "ctx.get", "ctx.get_batch", "ctx.history", "ctx.ls",
        "ctx.search", "ctx.delete", "ctx.purge", "node.status",
    }
)  # fmt: skip
REPLICA_METHODS = frozenset(
    {"rep.store", "rep.versions", "rep.purge", "rep.heads", "rep.search", "rep.ping"}
)
DEFAULT_TIMEOUT_S = 5.0
