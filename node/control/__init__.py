"""The control plane: Raft core, cluster-metadata state machine, duties, admin custody."""
