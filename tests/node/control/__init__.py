"""Tests of node.control: Raft core and transcripts, metadata, persistence, custody."""
