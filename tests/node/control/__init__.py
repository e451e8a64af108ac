"""Tests of node.control: the Raft core, the metadata state machine, persistence."""
