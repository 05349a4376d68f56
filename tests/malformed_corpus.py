"""Malformed request bodies for POST /commands and /commands/batch.

Every case must get a 4xx and record nothing. Bodies are built once at import,
and the largest are the 10,000-level nestings (about 50 KB each) and a gzip bomb
that expands to 8 MiB.
"""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

JSON = "application/json"
MSGPACK = "application/msgpack"
DEEP_LEVELS = 10_000
PAYLOAD_DEPTH_OVER_LIMIT = 40
"""Nesting inside a payload: over the node's limit of 32 levels, and far below
Python's recursion limit, so only the node's own depth check can reject it."""
GZIP_BOMB_BYTES = 8 << 20


@dataclass(frozen=True, slots=True)
class MalformedCase:
    """One request body that a node must reject with a 4xx."""

    name: str
    body: bytes
    content_type: str | None = JSON
    path: str = "/commands"
    headers: dict[str, str] = field(default_factory=dict)


def command_json(account: str = "corpus") -> dict[str, Any]:
    return {"type": "ledger.open", "payload": {"account": account, "currency": "EUR"}}


def as_json(value: Any) -> bytes:
    return json.dumps(value).encode()


def as_msgpack(value: Any) -> bytes:
    return bytes(msgpack.packb(value))


def deposit_text(amount: str) -> bytes:
    """A ledger.deposit body with `amount` pasted in as raw JSON text."""
    return (
        '{"type": "ledger.deposit", "payload": {"account": "corpus", "amount": '
        + amount
        + "}}"
    ).encode()


def nested_payload(levels: int) -> dict[str, Any]:
    inner: Any = "bottom"
    for _ in range(levels):
        inner = {"next": inner}
    return {"type": "ledger.open", "payload": {"account": "deep", "currency": inner}}


def msgpack_map(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """Pack a map from already packed keys and values, keeping duplicates."""
    assert len(pairs) < 16, "a fixmap holds at most 15 pairs"
    return bytes([0x80 | len(pairs)]) + b"".join(key + value for key, value in pairs)


def packed(value: Any) -> bytes:
    return as_msgpack(value)


VALID_JSON = as_json(command_json())
VALID_MSGPACK = as_msgpack(command_json())


def json_cases() -> list[MalformedCase]:
    cases = [
        # syntax
        MalformedCase("json-empty", b""),
        MalformedCase("json-whitespace", b" \r\n\t "),
        MalformedCase("json-truncated-object", VALID_JSON[:-5]),
        MalformedCase("json-truncated-string", b'{"type": "ledger.op'),
        MalformedCase("json-unclosed-array", b'{"type": "ledger.open", "payload": ['),
        MalformedCase("json-trailing-garbage", VALID_JSON + b" x"),
        MalformedCase("json-two-documents", VALID_JSON + VALID_JSON),
        MalformedCase("json-single-quotes", b"{'type': 'ledger.open', 'payload': {}}"),
        MalformedCase("json-trailing-comma", VALID_JSON[:-1] + b",}"),
        MalformedCase("json-comment", b"// a comment\n" + VALID_JSON),
        MalformedCase("json-unquoted-key", b'{type: "ledger.open", "payload": {}}'),
        MalformedCase(
            "json-raw-control-char", b'{"type": "ledger.open\x01", "payload": {}}'
        ),
        MalformedCase("json-bad-escape", b'{"type": "ledger.open\\q", "payload": {}}'),
        # text encoding
        MalformedCase("json-invalid-utf8", VALID_JSON.replace(b"corpus", b"corp\xffs")),
        MalformedCase(
            "json-overlong-utf8", VALID_JSON.replace(b"corpus", b"c\xc0\xafs")
        ),
        MalformedCase(
            "json-utf8-encoded-surrogate",
            VALID_JSON.replace(b"corpus", b"\xed\xa0\x80"),
        ),
        MalformedCase("json-utf16", json.dumps(command_json()).encode("utf-16")),
        MalformedCase(
            "json-lone-high-surrogate", VALID_JSON.replace(b"corpus", b"\\ud800")
        ),
        MalformedCase(
            "json-lone-low-surrogate-key",
            b'{"type": "ledger.open", "payload": {"\\udc00": 1}}',
        ),
        MalformedCase("json-surrogate-in-type", b'{"type": "\\ud83d", "payload": {}}'),
        # nesting
        MalformedCase("json-deep-arrays", b"[" * DEEP_LEVELS + b"]" * DEEP_LEVELS),
        MalformedCase(
            "json-deep-objects",
            b'{"a": ' * DEEP_LEVELS + b"1" + b"}" * DEEP_LEVELS,
        ),
        MalformedCase(
            "json-deep-payload",
            b'{"type": "ledger.open", "payload": '
            + b'{"a": ' * DEEP_LEVELS
            + b"1"
            + b"}" * DEEP_LEVELS
            + b"}",
        ),
        MalformedCase(
            "json-payload-over-depth-limit",
            as_json(nested_payload(PAYLOAD_DEPTH_OVER_LIMIT)),
        ),
        # numbers
        MalformedCase("json-1e400", deposit_text("1e400")),
        MalformedCase("json-minus-1e400", deposit_text("-1e400")),
        MalformedCase("json-5000-digit-integer", deposit_text("7" * 5000)),
        MalformedCase("json-nan", deposit_text("NaN")),
        MalformedCase("json-infinity", deposit_text("Infinity")),
        MalformedCase("json-minus-infinity", deposit_text("-Infinity")),
        MalformedCase("json-2-pow-64", deposit_text(str(2**64))),
        MalformedCase("json-minus-2-pow-63-minus-1", deposit_text(str(-(2**63) - 1))),
        MalformedCase("json-2-pow-53", deposit_text(str(2**53))),
        MalformedCase("json-negative-amount", deposit_text("-5")),
        MalformedCase("json-fraction-amount", deposit_text("5.5")),
        MalformedCase("json-exponent-amount", deposit_text("5e2")),
        MalformedCase("json-leading-zero", deposit_text("05")),
        MalformedCase("json-hex-number", deposit_text("0x10")),
        # top-level shapes
        MalformedCase("json-bare-string", b'"ledger.open"'),
        MalformedCase("json-bare-number", b"42"),
        MalformedCase("json-null", b"null"),
        MalformedCase("json-true", b"true"),
        MalformedCase("json-array", as_json([command_json()])),
        MalformedCase("json-empty-object", b"{}"),
        # wrong types
        MalformedCase("json-type-number", as_json({"type": 1, "payload": {}})),
        MalformedCase("json-type-null", as_json({"type": None, "payload": {}})),
        MalformedCase(
            "json-type-list", as_json({"type": ["ledger.open"], "payload": {}})
        ),
        MalformedCase("json-type-map", as_json({"type": {"name": "x"}, "payload": {}})),
        MalformedCase("json-type-empty", as_json({"type": "", "payload": {}})),
        MalformedCase(
            "json-type-unknown", as_json({"type": "ledger.void", "payload": {}})
        ),
        MalformedCase(
            "json-payload-string", as_json({"type": "ledger.open", "payload": "x"})
        ),
        MalformedCase(
            "json-payload-list", as_json({"type": "ledger.open", "payload": []})
        ),
        MalformedCase(
            "json-payload-null", as_json({"type": "ledger.open", "payload": None})
        ),
        MalformedCase(
            "json-payload-number", as_json({"type": "ledger.open", "payload": 0})
        ),
        MalformedCase("json-missing-payload", as_json({"type": "ledger.open"})),
        MalformedCase("json-missing-type", as_json({"payload": {}})),
        MalformedCase("json-extra-field", as_json({**command_json(), "stamp": 1})),
        MalformedCase(
            "json-account-number",
            as_json(
                {"type": "ledger.open", "payload": {"account": 7, "currency": "EUR"}}
            ),
        ),
        MalformedCase(
            "json-account-map",
            as_json(
                {"type": "ledger.open", "payload": {"account": {}, "currency": "EUR"}}
            ),
        ),
        MalformedCase(
            "json-account-too-long",
            as_json(
                {
                    "type": "ledger.open",
                    "payload": {"account": "a" * 129, "currency": "EUR"},
                }
            ),
        ),
        MalformedCase(
            "json-currency-unknown",
            as_json(
                {"type": "ledger.open", "payload": {"account": "c", "currency": "XXQ"}}
            ),
        ),
        MalformedCase("json-amount-string", deposit_text('"5"')),
        MalformedCase("json-amount-bool", deposit_text("true")),
        MalformedCase("json-amount-null", deposit_text("null")),
        MalformedCase("json-amount-list", deposit_text("[5]")),
        MalformedCase(
            "json-display-name-control-char",
            as_json(
                {
                    "type": "users.register",
                    "payload": {"username": "ctl", "display_name": "bell\u0007"},
                }
            ),
        ),
        MalformedCase(
            "json-username-empty-after-fold",
            as_json(
                {
                    "type": "users.register",
                    "payload": {"username": "\u200b\u200d", "display_name": "Z"},
                }
            ),
        ),
        # A map with a duplicate key means one thing to a first-wins parser and
        # another to a last-wins one, such as the standard library.
        MalformedCase(
            "json-duplicate-payload-key",
            b'{"type": "ledger.open", "payload": '
            b'{"account": "dup-json", "currency": "EUR", "currency": "USD"}}',
        ),
        MalformedCase(
            "json-duplicate-type-key",
            b'{"type": "ledger.deposit", "type": "ledger.open", "payload": '
            b'{"account": "dup-type", "currency": "EUR"}}',
        ),
    ]
    return cases


def msgpack_cases() -> list[MalformedCase]:
    timestamp = msgpack.Timestamp(1_700_000_000, 0)
    payload_key = packed("payload")
    account = packed("account")
    currency = packed("currency")
    cases = [
        MalformedCase("msgpack-empty", b""),
        MalformedCase("msgpack-truncated", VALID_MSGPACK[:-3]),
        MalformedCase("msgpack-trailing-bytes", VALID_MSGPACK + b"\xc0"),
        MalformedCase("msgpack-two-documents", VALID_MSGPACK + VALID_MSGPACK),
        MalformedCase("msgpack-reserved-byte", b"\xc1"),
        MalformedCase("msgpack-json-text", VALID_JSON),
        MalformedCase("msgpack-deep-arrays", b"\x91" * DEEP_LEVELS + b"\x90"),
        MalformedCase(
            "msgpack-deep-maps", (b"\x81" + packed("a")) * DEEP_LEVELS + b"\xc0"
        ),
        MalformedCase(
            "msgpack-payload-over-depth-limit",
            as_msgpack(nested_payload(PAYLOAD_DEPTH_OVER_LIMIT)),
        ),
        MalformedCase(
            "msgpack-ext-type",
            as_msgpack(
                {
                    "type": "ledger.deposit",
                    "payload": {"account": "x", "amount": msgpack.ExtType(5, b"ab")},
                }
            ),
        ),
        MalformedCase(
            "msgpack-ext-negative-type",
            msgpack_map(
                [
                    (packed("type"), packed("ledger.open")),
                    (payload_key, b"\xd4\x9c\x00"),
                ]
            ),
        ),
        MalformedCase(
            "msgpack-timestamp",
            as_msgpack(
                {
                    "type": "ledger.deposit",
                    "payload": {"account": "x", "amount": timestamp},
                }
            ),
        ),
        MalformedCase(
            "msgpack-timestamp-as-type",
            as_msgpack({"type": timestamp, "payload": {}}),
        ),
        MalformedCase(
            "msgpack-int-map-key",
            msgpack_map(
                [(packed("type"), packed("ledger.open")), (packed(1), packed({}))]
            ),
        ),
        MalformedCase(
            "msgpack-nil-map-key",
            msgpack_map([(packed(None), packed("ledger.open"))]),
        ),
        MalformedCase(
            "msgpack-array-map-key",
            msgpack_map([(packed([1]), packed("ledger.open"))]),
        ),
        MalformedCase(
            "msgpack-bytes-map-key",
            msgpack_map(
                [(packed(b"type"), packed("ledger.open")), (payload_key, packed({}))]
            ),
        ),
        MalformedCase(
            "msgpack-bytes-payload-key",
            as_msgpack({"type": "ledger.open", "payload": {b"account": "x"}}),
        ),
        MalformedCase(
            "msgpack-bytes-value",
            as_msgpack(
                {"type": "ledger.open", "payload": {"account": b"x", "currency": "EUR"}}
            ),
        ),
        MalformedCase(
            "msgpack-bytes-type", as_msgpack({"type": b"ledger.open", "payload": {}})
        ),
        MalformedCase(
            "msgpack-invalid-utf8-string",
            msgpack_map(
                [
                    (packed("type"), packed("ledger.open")),
                    (
                        payload_key,
                        msgpack_map(
                            [(account, b"\xa2\xff\xfe"), (currency, packed("EUR"))]
                        ),
                    ),
                ]
            ),
        ),
        MalformedCase(
            "msgpack-encoded-surrogate",
            msgpack_map(
                [
                    (packed("type"), packed("ledger.open")),
                    (
                        payload_key,
                        msgpack_map(
                            [(account, b"\xa3\xed\xa0\x80"), (currency, packed("EUR"))]
                        ),
                    ),
                ]
            ),
        ),
        MalformedCase(
            "msgpack-nan",
            msgpack_map(
                [
                    (packed("type"), packed("ledger.deposit")),
                    (
                        payload_key,
                        msgpack_map(
                            [
                                (account, packed("x")),
                                (
                                    packed("amount"),
                                    b"\xcb" + struct.pack(">d", float("nan")),
                                ),
                            ]
                        ),
                    ),
                ]
            ),
        ),
        MalformedCase(
            "msgpack-float32-infinity",
            msgpack_map(
                [
                    (packed("type"), packed("ledger.deposit")),
                    (
                        payload_key,
                        msgpack_map(
                            [
                                (account, packed("x")),
                                (
                                    packed("amount"),
                                    b"\xca" + struct.pack(">f", float("inf")),
                                ),
                            ]
                        ),
                    ),
                ]
            ),
        ),
        MalformedCase(
            "msgpack-uint64-max",
            as_msgpack(
                {
                    "type": "ledger.deposit",
                    "payload": {"account": "x", "amount": 2**64 - 1},
                }
            ),
        ),
        MalformedCase(
            "msgpack-int64-min",
            as_msgpack(
                {
                    "type": "ledger.deposit",
                    "payload": {"account": "x", "amount": -(2**63)},
                }
            ),
        ),
        MalformedCase("msgpack-huge-array-header", b"\xdd\xff\xff\xff\xff"),
        MalformedCase("msgpack-huge-map-header", b"\xdf\xff\xff\xff\xff"),
        MalformedCase("msgpack-huge-string-header", b"\xdb\xff\xff\xff\xffabc"),
        MalformedCase("msgpack-bare-string", packed("ledger.open")),
        MalformedCase("msgpack-bare-integer", packed(42)),
        MalformedCase("msgpack-nil", packed(None)),
        MalformedCase("msgpack-bare-binary", packed(VALID_JSON)),
        MalformedCase(
            "msgpack-payload-array", as_msgpack({"type": "ledger.open", "payload": []})
        ),
        MalformedCase(
            "msgpack-duplicate-type-key",
            msgpack_map(
                [
                    (packed("type"), packed("ledger.deposit")),
                    (packed("type"), packed("ledger.open")),
                    (
                        payload_key,
                        packed({"account": "dup-msgpack", "currency": "EUR"}),
                    ),
                ]
            ),
        ),
    ]
    return [MalformedCase(case.name, case.body, content_type=MSGPACK) for case in cases]


def encoding_cases() -> list[MalformedCase]:
    """Bodies whose Content-Encoding does not match their bytes, and a gzip bomb."""
    return [
        MalformedCase(
            "gzip-not-gzip", VALID_JSON, headers={"Content-Encoding": "gzip"}
        ),
        MalformedCase(
            "deflate-not-deflate", VALID_JSON, headers={"Content-Encoding": "deflate"}
        ),
        MalformedCase(
            "gzip-bomb",
            gzip.compress(b" " * GZIP_BOMB_BYTES + VALID_JSON),
            headers={"Content-Encoding": "gzip"},
        ),
    ]


def batch_cases() -> list[MalformedCase]:
    item = {"id": "batch-corpus", **command_json("batch-corpus")}
    cases = [
        MalformedCase("batch-map", as_json(item)),
        MalformedCase("batch-string", b'"batch"'),
        MalformedCase("batch-truncated", as_json([item])[:-3]),
        MalformedCase("batch-nested-array", as_json([[item]])),
        MalformedCase("batch-item-null", as_json([item, None])),
        MalformedCase("batch-deep-arrays", b"[" * DEEP_LEVELS + b"]" * DEEP_LEVELS),
        MalformedCase(
            "batch-lone-surrogate", as_json([item])[:-2] + b', "x": "\\ud800"}]'
        ),
        MalformedCase(
            "batch-msgpack-ext",
            as_msgpack([item, msgpack.ExtType(1, b"")]),
            content_type=MSGPACK,
        ),
    ]
    return [
        MalformedCase(
            case.name, case.body, content_type=case.content_type, path="/commands/batch"
        )
        for case in cases
    ]


CASES: list[MalformedCase] = (
    json_cases() + msgpack_cases() + encoding_cases() + batch_cases()
)
