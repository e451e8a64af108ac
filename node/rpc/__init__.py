"""RPC: wire frames, the mutual-TLS and in-memory transports, the peer pool, the RPC contract."""
