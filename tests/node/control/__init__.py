"""Tests of node.control: the Raft core and its transcripts, the metadata state machine, persistence, custody."""
