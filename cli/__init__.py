"""The ``slurp`` command: argument parsing and rendering only."""
