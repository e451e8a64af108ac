"""The cluster: ring, replication planning, membership, discovery, liveness, the node service."""
