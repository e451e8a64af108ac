"""crypto.shamir: SLIP-39 splitting of an age identity, share wrapping, wiping."""

from __future__ import annotations

import shutil
import subprocess
from itertools import combinations
from pathlib import Path

import pyrage
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrage import x25519
from shamir_mnemonic.wordlist import WORDLIST

from crypto.errors import CryptoError, DecryptionError, ShamirError
from crypto.shamir import (
    SplitResult,
    WipeableIdentity,
    combine_identity,
    decrypt_share,
    encrypt_share_to,
    split_identity,
)

SHAMIR_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


@st.composite
def split_parameters(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(threshold, shares, an order of share indices); SLIP-39 bans 1-of-n for n > 1."""
    shares = draw(st.integers(min_value=1, max_value=6))
    threshold = draw(st.integers(min_value=2 if shares > 1 else 1, max_value=shares))
    order = draw(st.permutations(range(shares)))
    return threshold, shares, list(order)


def _split(threshold: int = 3, shares: int = 5) -> tuple[x25519.Identity, SplitResult]:
    identity = x25519.Identity.generate()
    return identity, split_identity(str(identity), threshold, shares)


def _corrupt(mnemonic: str, word_index: int) -> str:
    """Replace one word with another valid word, so only the checksum can notice."""
    words = mnemonic.split()
    current = WORDLIST.index(words[word_index])
    words[word_index] = WORDLIST[(current + 1) % len(WORDLIST)]
    return " ".join(words)


@SHAMIR_SETTINGS
@given(params=split_parameters())
def test_any_threshold_shares_rebuild_and_fewer_do_not(params: tuple[int, int, list[int]]) -> None:
    """Any t of n shares rebuild the identity (it decrypts old data); any t-1 raise."""
    threshold, count, order = params
    identity = x25519.Identity.generate()
    recipient = str(identity.to_public())
    ciphertext = pyrage.encrypt(b"written before the split", [identity.to_public()])
    result = split_identity(str(identity), threshold, count)
    assert (result.admin_recipient, result.threshold, len(result.shares)) == (
        recipient,
        threshold,
        count,
    )
    chosen = [result.shares[i] for i in order[:threshold]]
    with combine_identity(chosen, expected_recipient=recipient) as rebuilt:
        assert rebuilt.recipient() == recipient
        assert pyrage.decrypt(ciphertext, [rebuilt.identity()]) == b"written before the split"
    if threshold > 1:
        with pytest.raises(ShamirError, match=f"need {threshold} shares, got {threshold - 1}"):
            combine_identity(chosen[:-1])


def test_every_three_of_five_rebuild_the_same_identity() -> None:
    """All C(5,3) subsets of a default split rebuild one and the same identity."""
    identity, result = _split()
    recipients = set()
    for subset in combinations(result.shares, 3):
        with combine_identity(subset) as rebuilt:
            recipients.add(rebuilt.recipient())
    assert recipients == {str(identity.to_public())}


def test_extra_and_duplicate_shares_are_accepted() -> None:
    """More than t shares, or a share given twice, still rebuild."""
    identity, result = _split()
    shares = [result.shares[0], result.shares[0], *result.shares[1:]]
    with combine_identity(shares) as rebuilt:
        assert rebuilt.recipient() == str(identity.to_public())
    with pytest.raises(ShamirError, match="need 3 shares, got 2"):
        combine_identity([result.shares[0], result.shares[0], result.shares[1]])


@pytest.mark.parametrize("word_index", [0, 5, 10, 19])
def test_corrupted_share_is_refused(word_index: int) -> None:
    """A share with one word changed is named by position, its words not echoed."""
    _, result = _split()
    shares = [result.shares[0], _corrupt(result.shares[1], word_index), result.shares[2]]
    with pytest.raises(ShamirError, match="share 2 is corrupted") as caught:
        combine_identity(shares)
    assert not any(word in str(caught.value).split() for word in result.shares[1].split())


def test_shares_of_different_splits_are_refused() -> None:
    """Two shares of one split plus one of another split of the same identity are refused."""
    identity, first = _split()
    second = split_identity(str(identity), 3, 5)
    while second.shares[0].split()[:2] == first.shares[0].split()[:2]:  # same 15-bit id
        second = split_identity(str(identity), 3, 5)
    with pytest.raises(ShamirError, match="different splits"):
        combine_identity([first.shares[0], first.shares[1], second.shares[2]])


def test_expected_recipient_mismatch_is_refused() -> None:
    """Shares that rebuild some other identity than the recorded one are refused."""
    _, result = _split()
    other = str(x25519.Identity.generate().to_public())
    with pytest.raises(ShamirError, match="does not match the recorded recipient"):
        combine_identity(result.shares[:3], expected_recipient=other)


def test_passphrase_is_needed_to_rebuild_the_same_identity() -> None:
    """With a passphrase, the right one rebuilds the identity and a wrong one is caught."""
    identity = x25519.Identity.generate()
    recipient = str(identity.to_public())
    result = split_identity(str(identity), 2, 3, passphrase=b"correct horse")
    with combine_identity(
        result.shares[:2], expected_recipient=recipient, passphrase=b"correct horse"
    ) as rebuilt:
        assert rebuilt.recipient() == recipient
    with pytest.raises(ShamirError, match="wrong shares or passphrase"):
        combine_identity(result.shares[:2], expected_recipient=recipient, passphrase=b"wrong")


@pytest.mark.parametrize(("threshold", "shares"), [(0, 3), (4, 3), (3, 17), (1, 3), (-1, -1)])
def test_bad_split_parameters_are_refused(threshold: int, shares: int) -> None:
    """Counts outside SLIP-39's limits (1 <= t <= n <= 16, no 1-of-n) raise ShamirError."""
    identity = x25519.Identity.generate()
    with pytest.raises(ShamirError):
        split_identity(str(identity), threshold, shares)


@pytest.mark.parametrize(
    "text", ["", "age1qqqq", "AGE-SECRET-KEY-1QQQQ", "not a key", "AGE-PLUGIN-FOO-1QQQQ"]
)
def test_non_identity_is_refused(text: str) -> None:
    """Only an AGE-SECRET-KEY-1 bech32 string of 32 bytes can be split."""
    with pytest.raises(ShamirError, match="not an age X25519 identity"):
        split_identity(text)


def test_one_of_one_split() -> None:
    """A 1-of-1 split is allowed and rebuilds from its single share."""
    identity, result = _split(1, 1)
    with combine_identity(result.shares) as rebuilt:
        assert rebuilt.recipient() == str(identity.to_public())


def test_split_result_repr_hides_shares() -> None:
    """Logging a SplitResult does not log the shares."""
    _, result = _split()
    assert result.shares[0] not in repr(result)


def test_wipe_zeroes_the_secret_and_refuses_further_use() -> None:
    """wipe() zeroes the bytearray it owns; identity()/recipient() then raise."""
    _identity, result = _split()
    rebuilt = combine_identity(result.shares[:3])
    secret = rebuilt._secret
    assert secret is not None
    assert any(secret)
    rebuilt.wipe()
    assert secret == bytearray(32)
    assert rebuilt.wiped
    with pytest.raises(CryptoError, match="wiped"):
        rebuilt.identity()
    with pytest.raises(CryptoError, match="wiped"):
        rebuilt.recipient()
    rebuilt.wipe()  # idempotent


def test_context_exit_wipes_even_on_error() -> None:
    """Leaving the with-block wipes, also when it is left by an exception."""
    _, result = _split()
    with pytest.raises(RuntimeError), combine_identity(result.shares[:3]) as rebuilt:
        raise RuntimeError("boom")
    assert rebuilt.wiped


def test_wipeable_identity_wants_32_bytes() -> None:
    """A WipeableIdentity of the wrong length is refused."""
    with pytest.raises(ShamirError):
        WipeableIdentity(bytearray(31))


def test_share_round_trips_through_node_recipient() -> None:
    """A share encrypted to a node's recipient decrypts with the node's identity only."""
    _, result = _split()
    node = x25519.Identity.generate()
    wrapped = encrypt_share_to(result.shares[0], str(node.to_public()))
    assert result.shares[0].encode() not in wrapped
    assert decrypt_share(wrapped, node) == result.shares[0]
    with pytest.raises(DecryptionError):
        decrypt_share(wrapped, x25519.Identity.generate())
    with pytest.raises(DecryptionError):
        decrypt_share(wrapped[:-10], node)
    with pytest.raises(DecryptionError):
        decrypt_share(b"garbage", node)


def test_encrypt_share_to_validates_inputs() -> None:
    """Only a SLIP-39 share is wrapped, and only to an age X25519 recipient."""
    _, result = _split()
    node = str(x25519.Identity.generate().to_public())
    with pytest.raises(ShamirError):
        encrypt_share_to("not a share", node)
    with pytest.raises(CryptoError, match="recipient"):
        encrypt_share_to(result.shares[0], "age1notarecipient")


def test_decrypt_share_refuses_non_share_plaintext() -> None:
    """Something age-encrypted to the node that is not a share is refused."""
    node = x25519.Identity.generate()
    with pytest.raises(ShamirError):
        decrypt_share(pyrage.encrypt(b"hello", [node.to_public()]), node)


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("age") is None, reason="needs the age CLI")
def test_age_cli_decrypts_a_wrapped_share(tmp_path: Path) -> None:
    """`age -d -i node.key` decrypts a share wrapped to age-keygen's recipient."""
    key_file = tmp_path / "node.key"
    subprocess.run(["age-keygen", "-o", str(key_file)], check=True, capture_output=True)
    recipient = subprocess.run(
        ["age-keygen", "-y", str(key_file)], check=True, capture_output=True, text=True
    ).stdout.strip()
    _, result = _split()
    (tmp_path / "share.age").write_bytes(encrypt_share_to(result.shares[4], recipient))
    plain = subprocess.run(
        ["age", "-d", "-i", str(key_file), str(tmp_path / "share.age")],
        check=True,
        capture_output=True,
    ).stdout
    assert plain.decode() == result.shares[4]
