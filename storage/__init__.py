"""slurp's storage layer: UCXL addresses, records, LevelDB store, cache, index, ContextStore.

May import ``crypto``; must not import ``node`` or ``cli``.
"""
