"""Parsing of the membership requests (``ctl.member_*``, ``ctl.member``): 400 naming the field."""

from __future__ import annotations

from typing import Any

import pytest
from pyrage import x25519

from node.cluster.requests import parse_request
from storage.errors import InvalidPayload

RECIPIENT = str(x25519.Identity.generate().to_public())


def _add(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": "node4", "node_id": "abc123", "recipient": RECIPIENT,
        "signing_key": b"k" * 32, "rpc_host": "127.0.0.1", "rpc_port": 7004,
    }  # fmt: skip
    body.update(changes)
    return body


def test_a_well_formed_add_parses() -> None:
    args = parse_request("ctl.member_add", _add()).args
    assert args == {**_add(), "signing_key": b"k" * 32}


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": 4}, "name"),
        ({"node_id": "x" * 200}, "node_id"),
        ({"recipient": "age1nope"}, "recipient"),
        ({"signing_key": b"short"}, "signing_key"),
        ({"signing_key": "k" * 32}, "signing_key"),
        ({"rpc_port": 70000}, "rpc_port"),
        ({"rpc_port": True}, "rpc_port"),
        ({"rpc_host": None}, "rpc_host"),
    ],
)
def test_a_malformed_add_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayload) as refused:
        parse_request("ctl.member_add", _add(**changes))
    assert refused.value.field == field


def test_remove_and_forget_take_a_name() -> None:
    assert parse_request("ctl.member_remove", {"name": "node2"}).args == {"name": "node2"}
    with pytest.raises(InvalidPayload) as refused:
        parse_request("ctl.member_forget", {})
    assert refused.value.field == "name"


def test_the_forwarded_form_checks_the_inner_request() -> None:
    body = {"method": "ctl.member_remove", "body": {"name": "node2"}, "client_name": "client"}
    args = parse_request("ctl.member", body).args
    assert args == {"method": "ctl.member_remove", "request": {"name": "node2"},
                    "client_name": "client"}  # fmt: skip
    with pytest.raises(InvalidPayload) as refused:
        parse_request("ctl.member", {**body, "method": "ctx.purge"})
    assert refused.value.field == "method"
    with pytest.raises(InvalidPayload) as inner:
        parse_request("ctl.member", {**body, "body": {"name": 1}})
    assert inner.value.field == "name"
