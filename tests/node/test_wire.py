"""node.rpc.wire: frames, message validation and the handshake, as pure transcripts."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import FrameTooLarge, ProtocolError, RemoteError
from node.rpc.wire import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Error,
    FrameDecoder,
    Handshake,
    HandshakeState,
    Hello,
    Message,
    Request,
    Response,
    Welcome,
    connection_error,
    decode_frame,
    encode,
)

EXAMPLES: list[Message] = [
    Hello(protocol=1, node=None),
    Hello(protocol=1, node="node-b"),
    Welcome(protocol=1, node="node-a"),
    Request(id=7, method="store", deadline_ms=2500, body={"address": "ucxl://a", "n": [1, 2]}),
    Response(id=7, body={"version": 3, "blob": b"\x00\xff"}),
    Error(id=7, code="UCXL-404-NOT_FOUND", message="no such context", field="path"),
    Error(id=None, code="UCXL-400-INVALID_PAYLOAD", message="bad frame", field=None),
]


# The frames of EXAMPLES as main wrote them before encode's fast path (2904d29): what goes on
# the wire must not change, so that nodes of both versions keep talking.
GOLDEN_FRAMES = [
    "0000001c83a46b696e64a568656c6c6fa870726f746f636f6c01a46e6f6465c0",
    "0000002283a46b696e64a568656c6c6fa870726f746f636f6c01a46e6f6465a66e6f64652d62",
    "0000002483a46b696e64a777656c636f6d65a870726f746f636f6c01a46e6f6465a66e6f64652d61",
    "0000004a85a46b696e64a772657175657374a2696407a66d6574686f64a573746f7265ab646561646c696e"
    "655f6d73cd09c4a4626f647982a761646472657373a87563786c3a2f2f61a16e920102",
    "0000002b83a46b696e64a8726573706f6e7365a2696407a4626f647982a776657273696f6e03a4626c6f62c4"
    "0200ff",
    "0000004b85a46b696e64a56572726f72a2696407a4636f6465b25543584c2d3430342d4e4f545f464f554e"
    "44a76d657373616765af6e6f207375636820636f6e74657874a56669656c64a470617468",
    "0000004785a46b696e64a56572726f72a26964c0a4636f6465b85543584c2d3430302d494e56414c49445f"
    "5041594c4f4144a76d657373616765a9626164206672616d65a56669656c64c0",
]


def _frame(raw: Any) -> bytes:
    """A frame around any msgpack value, bypassing encode's validation."""
    body: bytes = msgpack.packb(raw, use_bin_type=True)
    return len(body).to_bytes(4, "big") + body


def _refusal(data: bytes, max_frame_bytes: int = MAX_FRAME_BYTES) -> str:
    with pytest.raises(ProtocolError) as caught:
        FrameDecoder(max_frame_bytes).feed(data)
    return caught.value.reason


# --- frames --------------------------------------------------------------------------


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_every_kind_round_trips(msg: Message) -> None:
    """encode then decode gives the same message; the prefix is the body length."""
    frame = encode(msg)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_frame(frame) == msg


def test_encode_writes_the_same_bytes_as_before() -> None:
    """Every kind encodes to the bytes the previous encoder wrote (wire compatibility)."""
    assert [encode(msg).hex() for msg in EXAMPLES] == GOLDEN_FRAMES


def test_decoder_reassembles_frames_fed_byte_by_byte_and_in_one_chunk() -> None:
    """Frames split anywhere, or many in one chunk, come out whole and in order."""
    stream = b"".join(encode(m) for m in EXAMPLES)
    byte_by_byte = FrameDecoder()
    out: list[Message] = []
    for i in range(len(stream)):
        out += byte_by_byte.feed(stream[i : i + 1])
    assert out == EXAMPLES
    assert byte_by_byte.buffered_bytes == 0
    assert FrameDecoder().feed(stream) == EXAMPLES


chunkings = st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=40)
bodies = st.dictionaries(
    st.text(max_size=8),
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
    max_size=6,
)
requests = st.builds(
    Request,
    id=st.integers(0, 2**63 - 1),
    method=st.text(min_size=1, max_size=20),
    deadline_ms=st.integers(0, 2**31),
    body=bodies,
)


@given(st.lists(requests, min_size=1, max_size=5), chunkings)
def test_requests_survive_any_chunking(msgs: list[Request], sizes: list[int]) -> None:
    """Any requests, cut into any chunk sizes, decode to themselves in order."""
    stream = b"".join(encode(m) for m in msgs)
    decoder, out, start = FrameDecoder(), [], 0
    for size in sizes * (len(stream) // sum(sizes) + 1):
        out += decoder.feed(stream[start : start + size])
        start += size
    assert out == msgs


def test_oversized_length_is_refused_from_the_prefix_alone() -> None:
    """A 0xFFFFFFFF prefix fails as soon as its 4 bytes arrive, before any body."""
    decoder = FrameDecoder(max_frame_bytes=1024)
    assert decoder.feed(b"\xff\xff") == []
    with pytest.raises(FrameTooLarge) as caught:
        decoder.feed(b"\xff\xff")
    assert (caught.value.size, caught.value.limit) == (0xFFFFFFFF, 1024)
    assert decoder.buffered_bytes == 0
    with pytest.raises(ProtocolError, match="already failed"):
        decoder.feed(encode(EXAMPLES[0]))


def test_frame_limit_is_inclusive_and_applies_to_encode() -> None:
    """A body of exactly the limit passes; one byte more is refused on both ends."""
    msg = Response(id=1, body={"x": b"a" * 100})
    size = len(encode(msg)) - 4
    assert FrameDecoder(max_frame_bytes=size).feed(encode(msg)) == [msg]
    assert "exceeds" in _refusal(encode(msg), max_frame_bytes=size - 1)
    with pytest.raises(FrameTooLarge):
        encode(msg, max_frame_bytes=size - 1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x00\x00\x00\x03\xc1\xc1\xc1", "not valid msgpack"),
        (b"\x00\x00\x00\x00", "not valid msgpack"),
        (b"\x00\x00\x00\x02\x01\x02", "not valid msgpack"),  # trailing data
        (_frame([1, 2]), "not a map"),
        (_frame({1: "int key"}), "not valid msgpack"),
        (_frame({"kind": "gossip"}), "unknown message kind 'gossip'"),
        (_frame({"no": "kind"}), "unknown message kind 'None'"),
        (_frame({"kind": "request", "id": 1, "method": "m"}), "request lacks deadline_ms, body"),
        (
            _frame({"kind": "request", "id": True, "method": "m", "deadline_ms": 1, "body": {}}),
            "id must be an integer",
        ),
        (
            _frame({"kind": "request", "id": -1, "method": "m", "deadline_ms": 1, "body": {}}),
            "id must be an integer",
        ),
        (
            _frame({"kind": "request", "id": 1, "method": "", "deadline_ms": 1, "body": {}}),
            "method must be 1 to 128 characters",
        ),
        (
            _frame({"kind": "request", "id": 1, "method": "m", "deadline_ms": "1", "body": {}}),
            "deadline_ms must be an integer",
        ),
        (_frame({"kind": "response", "id": 1, "body": [1]}), "body must be a map"),
        (
            _frame({"kind": "error", "id": 1, "code": "404", "message": "x", "field": None}),
            "code must look like UCXL-NNN-NAME",
        ),
        (_frame({"kind": "hello", "protocol": 1, "node": 5}), "node must be a string or nil"),
        (_frame({"kind": "welcome", "protocol": 1, "node": None}), "node must be a string"),
    ],
)
def test_malformed_frames_raise_protocol_error(data: bytes, reason: str) -> None:
    """Every malformed body is a ProtocolError whose reason says what is wrong."""
    assert reason in _refusal(data)


def test_extension_types_are_refused_and_unknown_keys_ignored() -> None:
    """msgpack ext values are not part of the protocol; extra keys are (forward compat)."""
    ext = msgpack.packb({"kind": "response", "id": 1, "body": {"x": msgpack.ExtType(5, b"")}})
    assert "not valid msgpack" in _refusal(len(ext).to_bytes(4, "big") + ext)
    extra = _frame({"kind": "hello", "protocol": 1, "node": None, "compression": "zstd"})
    assert FrameDecoder().feed(extra) == [Hello(1, None)]


def test_messages_refuse_invalid_fields_when_built_locally() -> None:
    """The dataclasses validate too, so encode never sends a malformed message."""
    with pytest.raises(ValueError, match="body must be a map"):
        Request(id=1, method="m", deadline_ms=1, body={1: "x"})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        encode(Response(id=1, body={"x": object()}))


# --- handshake transcripts ------------------------------------------------------------


def _server(peer_name: str = "alice", peer_kind: str = "client") -> Handshake:
    return Handshake.server(node="node-a", peer_name=peer_name, peer_kind=peer_kind)


def test_transcript_client_and_server_agree() -> None:
    """client: hello → server: welcome → both established; requests and answers flow."""
    client, server = Handshake.client(), _server()
    hello = client.start()
    assert hello == Hello(protocol=PROTOCOL_VERSION, node=None)
    assert client.state is HandshakeState.AWAIT_WELCOME
    welcome = server.receive(hello)
    assert welcome == Welcome(protocol=PROTOCOL_VERSION, node="node-a")
    assert client.receive(welcome) is None
    assert client.established
    assert server.established
    assert client.peer_node == "node-a"
    request = Request(1, "ping", 100, {})
    assert server.expect_request(request) is request
    assert client.expect_reply(Response(1, {})) == Response(1, {})


def test_transcript_node_dials_node_under_its_certificate_name() -> None:
    """A hello naming a node is accepted when the certificate is that node's."""
    server = _server(peer_name="node-b", peer_kind="node")
    server.receive(Hello(1, "node-b"))
    assert (server.established, server.peer_node) == (True, "node-b")


@pytest.mark.parametrize(
    ("peer_name", "peer_kind", "hello", "reason"),
    [
        ("alice", "client", Hello(2, None), "unsupported protocol version 2"),
        ("alice", "client", Hello(1, "node-b"), "hello names node 'node-b'"),
        ("node-c", "node", Hello(1, "node-b"), "hello names node 'node-b'"),
        ("alice", "client", Request(1, "m", 1, {}), "unexpected request in state await-hello"),
        ("alice", "client", Welcome(1, "x"), "unexpected welcome in state await-hello"),
    ],
)
def test_transcript_server_refuses_a_bad_opening(
    peer_name: str, peer_kind: str, hello: Message, reason: str
) -> None:
    """server: anything but an honest hello of a supported version → ProtocolError, FAILED."""
    server = _server(peer_name, peer_kind)
    with pytest.raises(ProtocolError) as caught:
        server.receive(hello)
    assert reason in caught.value.reason
    assert server.state is HandshakeState.FAILED


def test_transcript_server_refuses_hello_twice_and_answers_from_clients() -> None:
    """After the welcome only requests may come from a client."""
    server = _server()
    server.receive(Hello(1, None))
    with pytest.raises(ProtocolError, match="unexpected hello from a client"):
        server.expect_request(Hello(1, None))
    with pytest.raises(ProtocolError, match="unexpected response"):
        _server().expect_request(Response(1, {}))


def test_transcript_client_refused_by_server_raises_remote_error() -> None:
    """client: hello → server: error → RemoteError carrying the server's code."""
    client = Handshake.client()
    client.start()
    refusal = connection_error(ProtocolError("unsupported protocol version 1"))
    with pytest.raises(RemoteError) as caught:
        client.receive(refusal)
    assert caught.value.code == "UCXL-400-INVALID_PAYLOAD"
    assert client.state is HandshakeState.FAILED


def test_transcript_client_refuses_out_of_order_messages() -> None:
    """A client must start first, and accepts only a welcome, then only answers."""
    client = Handshake.client(node="node-b")
    with pytest.raises(ProtocolError, match="unexpected welcome in state idle"):
        client.receive(Welcome(1, "node-a"))
    client = Handshake.client()
    client.start()
    with pytest.raises(RuntimeError):
        client.start()
    with pytest.raises(ProtocolError, match="welcome for protocol 2"):
        client.receive(Welcome(2, "node-a"))
    client = Handshake.client()
    client.start()
    client.receive(Welcome(1, "node-a"))
    with pytest.raises(ProtocolError, match="unexpected request from a server"):
        client.expect_reply(Request(1, "m", 1, {}))
