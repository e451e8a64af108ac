"""When a role's key is due for rotation: the warnings ``slurp stats`` shows.

Owns the rule "a role key older than ``keys.max_key_age_days``, or a rotation left
unfinished, deserves a warning". Depends only on the keyring, so the ContextStore can
report it while ``storage.rotation`` (which drives a ContextStore) stays above the store in
the import graph: ``rotation -> context_store -> key_age``, no cycle.
"""

from __future__ import annotations

from datetime import UTC, datetime

from crypto.keyring import Keyring


def rotation_warnings(keyring: Keyring, max_age_days: int, now: datetime) -> list[str]:
    """Warnings for ``slurp stats``: role keys older than ``max_age_days``, unfinished rotations.

    ``max_age_days == 0`` turns the age warning off. ``now`` must be timezone-aware.
    """
    out = []
    for rk in keyring.role_keys():
        name = rk.role.name
        rotation = keyring.rotation_in_progress(name)
        if rotation is not None:
            out.append(
                f"the key rotation of role {name!r} (version {rotation['from_version']} -> "
                f"{rotation['to_version']}) is unfinished: run `slurp keys rotate {name}`"
            )
            continue
        created = datetime.strptime(rk.version(rk.current).created_at, "%Y-%m-%dT%H:%M:%SZ")
        age_days = (now - created.replace(tzinfo=UTC)).days
        if max_age_days and age_days > max_age_days:
            out.append(
                f"the key of role {name!r} (version {rk.current}) is {age_days} days old, "
                f"more than keys.max_key_age_days = {max_age_days}: run "
                f"`slurp keys rotate {name}`"
            )
    return out
