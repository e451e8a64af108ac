"""Bech32 (BIP 173) encoding, as age uses it for its keys.

Owns: turning bytes into a bech32 string and back, checksum included. age encodes
recipients (``age1...``) and identities (``AGE-SECRET-KEY-1...``) in original bech32
(checksum constant 1, not bech32m) and does not apply BIP 173's 90-character limit.

Must not know: anything about age keys, Shamir or slurp. Invariants: ``decode`` accepts a
string only if it is all lower case or all upper case and its checksum holds; ``decode``
returns lower-case ``hrp``; ``encode`` returns lower case (callers upper-case it themselves,
as age does for identities). Errors are ``ValueError`` whose text never echoes the input.
"""

from __future__ import annotations

CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
_CHECKSUM_CONSTANT = 1  # BIP 173 bech32; bech32m (BIP 350) would be 0x2BC830A3
_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: list[int]) -> int:
    """BIP 173 checksum: the BCH code's remainder over GF(32)."""
    chk = 1
    for value in values:
        top = chk >> 25
        chk = (chk & 0x1FFFFFF) << 5 ^ value
        for i, gen in enumerate(_GENERATOR):
            if (top >> i) & 1:
                chk ^= gen
    return chk


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _convert_bits(data: bytes | list[int], from_bits: int, to_bits: int, *, pad: bool) -> list[int]:
    """Regroup a stream of ``from_bits``-bit values into ``to_bits``-bit values (BIP 173)."""
    acc = 0
    bits = 0
    out: list[int] = []
    max_value = (1 << to_bits) - 1
    for value in data:
        acc = (acc << from_bits) | value
        bits += from_bits
        while bits >= to_bits:
            bits -= to_bits
            out.append((acc >> bits) & max_value)
    if pad and bits:
        out.append((acc << (to_bits - bits)) & max_value)
    elif not pad and (bits >= from_bits or (acc << (to_bits - bits)) & max_value):
        raise ValueError("bech32: invalid padding")
    return out


def encode(hrp: str, data: bytes) -> str:
    """Encode ``data`` under the human-readable part ``hrp``.

    Args:
        hrp: The human-readable prefix, e.g. ``"age"``; lower-cased before use.
        data: The payload.

    Returns:
        The lower-case bech32 string ``hrp + "1" + data + checksum``.

    Raises:
        ValueError: ``hrp`` is empty or has characters outside ASCII 33..126.
    """
    hrp = hrp.lower()
    if not hrp or any(not 33 <= ord(c) <= 126 for c in hrp):
        raise ValueError("bech32: invalid human-readable part")
    values = _convert_bits(data, 8, 5, pad=True)
    polymod = _polymod([*_hrp_expand(hrp), *values, 0, 0, 0, 0, 0, 0]) ^ _CHECKSUM_CONSTANT
    checksum = [(polymod >> 5 * (5 - i)) & 31 for i in range(6)]
    return hrp + "1" + "".join(CHARSET[v] for v in values + checksum)


def decode(text: str) -> tuple[str, bytes]:
    """Decode a bech32 string.

    Args:
        text: An all-lower-case or all-upper-case bech32 string.

    Returns:
        ``(hrp, data)`` with ``hrp`` in lower case.

    Raises:
        ValueError: Mixed case, bad characters, no separator, bad checksum or bad padding.
    """
    if text.lower() != text and text.upper() != text:
        raise ValueError("bech32: mixed case")
    text = text.lower()
    sep = text.rfind("1")
    if sep < 1 or sep + 7 > len(text) or any(not 33 <= ord(c) <= 126 for c in text):
        raise ValueError("bech32: malformed string")
    hrp, rest = text[:sep], text[sep + 1 :]
    if any(c not in CHARSET for c in rest):
        raise ValueError("bech32: invalid character")
    values = [CHARSET.index(c) for c in rest]
    if _polymod(_hrp_expand(hrp) + values) != _CHECKSUM_CONSTANT:
        raise ValueError("bech32: checksum mismatch")
    return hrp, bytes(_convert_bits(values[:-6], 5, 8, pad=False))
