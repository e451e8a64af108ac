"""Tests of the control plane: the Raft core and its transcripts."""
