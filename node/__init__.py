"""slurp's node daemon and client SDK (cluster issue). Imports ``storage`` and ``crypto``."""
