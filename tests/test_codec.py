"""Tests for the msgpack codec, value checks and fingerprints in cmdlog.codec."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import math
import random
from decimal import Decimal
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cmdlog import codec
from cmdlog.codec import DEPTH_MAX, INT_MAX, INT_MIN
from cmdlog.errors import MalformedBody

# Values of the JSON data model that check_value accepts: text without lone
# surrogates (st.text() draws only characters that encode to UTF-8), integers
# that fit msgpack, finite floats, lists and string-keyed maps.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(INT_MIN, INT_MAX),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)


def json_trees(scalars: st.SearchStrategy[Any], leaves_max: int) -> Any:
    """Return a strategy for lists and string-keyed maps nested over `scalars`."""
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(st.text(max_size=8), children, max_size=5),
        ),
        max_leaves=leaves_max,
    )


json_values = json_trees(json_scalars, 30)
json_maps = json_values.map(
    lambda value: value if type(value) is dict else {"value": value}
)

# Small maps over few keys and values, so that two draws are often equal and
# the int 1, the float 1.0 and True meet each other.
small_maps = st.dictionaries(
    st.sampled_from("abc"),
    st.one_of(
        st.sampled_from([0, 1, 1.0, True, None, "1"]),
        st.lists(st.sampled_from([0, 1]), max_size=2),
    ),
    max_size=3,
)


def reorder_maps(value: Any, rng: random.Random) -> Any:
    """Return a copy of `value` with every map's keys inserted in a random order."""
    if type(value) is dict:
        keys = list(value)
        rng.shuffle(keys)
        return {key: reorder_maps(value[key], rng) for key in keys}
    if type(value) is list:
        return [reorder_maps(item, rng) for item in value]
    return value


def reverse_maps(value: Any) -> Any:
    """Return a copy of `value` with every map's keys in reverse insertion order."""
    if type(value) is dict:
        return {key: reverse_maps(value[key]) for key in reversed(value)}
    if type(value) is list:
        return [reverse_maps(item) for item in value]
    return value


def nest_lists(depth: int) -> Any:
    """Return the integer 1 inside `depth` nested lists."""
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def nest_maps(depth: int) -> Any:
    """Return the integer 1 inside `depth` nested single-key maps."""
    value: Any = 1
    for _ in range(depth):
        value = {"k": value}
    return value


def rejection_message(value: Any, field: str = "payload") -> str:
    """Return the message of the MalformedBody that check_value raises."""
    with pytest.raises(MalformedBody) as excinfo:
        codec.check_value(value, field)
    return excinfo.value.message


def unpack_error(data: bytes) -> MalformedBody:
    """Return the MalformedBody that unpack raises for `data`."""
    with pytest.raises(MalformedBody) as excinfo:
        codec.unpack(data)
    return excinfo.value


# Canonical encoding and fingerprints.


@given(json_values, st.randoms(use_true_random=False))
def test_canonical_ignores_key_order(value: Any, rng: random.Random) -> None:
    """Reordering map keys at any depth leaves the canonical bytes unchanged."""
    assert codec.canonical(reorder_maps(value, rng)) == codec.canonical(value)
    assert codec.canonical(reverse_maps(value)) == codec.canonical(value)


@given(json_maps, st.randoms(use_true_random=False))
def test_fingerprint_ignores_key_order(
    payload: dict[str, Any], rng: random.Random
) -> None:
    """Reordering payload keys at any depth leaves the fingerprint unchanged."""
    expected = codec.fingerprint("ledger.charge", payload)
    assert codec.fingerprint("ledger.charge", reorder_maps(payload, rng)) == expected
    assert codec.fingerprint("ledger.charge", reverse_maps(payload)) == expected


@given(st.text(min_size=1, max_size=20), json_maps)
def test_fingerprint_hashes_the_canonical_pair(
    type_name: str, payload: dict[str, Any]
) -> None:
    """Flat or nested, a payload's fingerprint is the hash of the canonical
    encoding of [type, payload], so every node computes the same one."""
    expected = hashlib.blake2b(
        codec.canonical([type_name, payload]), digest_size=codec.FINGERPRINT_BYTES
    ).digest()
    assert codec.fingerprint(type_name, payload) == expected


def test_canonical_sorts_nested_maps() -> None:
    """Maps inside lists inside maps are sorted too, not only the top level."""
    written = {"z": [{"b": {"y": 1, "x": 2}, "a": 3}], "a": None}
    sorted_form = {"a": None, "z": [{"a": 3, "b": {"x": 2, "y": 1}}]}
    assert codec.canonical(written) == codec.pack(sorted_form)


def test_sort_maps_keeps_values() -> None:
    """sort_maps changes only key order, never keys, values or list order."""
    value = {"b": [3, 1, 2], "a": {"d": "x", "c": [True, None, 1.5]}}
    result = codec.sort_maps(value)
    assert result == value
    assert list(result) == ["a", "b"]
    assert list(result["a"]) == ["c", "d"]
    assert result["b"] == [3, 1, 2]


def test_fingerprint_differs_by_type() -> None:
    """One payload under two command types has two fingerprints."""
    payload = {"account": "a", "amount": 5}
    charge = codec.fingerprint("ledger.charge", payload)
    deposit = codec.fingerprint("ledger.deposit", payload)
    assert charge != deposit


def test_fingerprint_differs_by_payload() -> None:
    """Payloads that differ in one nested value have different fingerprints."""
    first = codec.fingerprint("t", {"a": {"b": [1, 2]}})
    second = codec.fingerprint("t", {"a": {"b": [1, 3]}})
    assert first != second


def test_fingerprint_distinguishes_int_and_float() -> None:
    """The integer 1 and the float 1.0 give different fingerprints."""
    assert codec.fingerprint("t", {"a": 1}) != codec.fingerprint("t", {"a": 1.0})
    assert codec.fingerprint("t", {"a": 1}) != codec.fingerprint("t", {"a": True})


def test_fingerprint_size() -> None:
    """A fingerprint has FINGERPRINT_BYTES bytes."""
    digest = codec.fingerprint("t", {})
    assert len(digest) == codec.FINGERPRINT_BYTES


@given(small_maps, small_maps)
def test_fingerprint_tracks_canonical(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    """Payloads have equal fingerprints exactly when their canonical bytes match."""
    same_bytes = codec.canonical(first) == codec.canonical(second)
    same_fingerprint = codec.fingerprint("t", first) == codec.fingerprint("t", second)
    assert same_fingerprint == same_bytes


# Round trip.


@given(json_values)
def test_round_trip(value: Any) -> None:
    """unpack(pack(value)) equals the value, with the same types throughout."""
    data = codec.pack(value)
    decoded = codec.unpack(data)
    assert decoded == value
    # == treats 1, 1.0 and True as equal, so compare the encodings as well.
    assert codec.pack(decoded) == data


# Any value msgpack can encode, not only the JSON model: bytes, extension
# types, timestamps and maps with integer or bytes keys as well.
msgpack_scalars = st.one_of(
    json_scalars,
    st.binary(max_size=8),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 2**34 - 1), st.integers(0, 10**9 - 1)),
)
msgpack_values = st.recursive(
    msgpack_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=4), st.integers(0, 9), st.binary(max_size=4)),
            children,
            max_size=4,
        ),
    ),
    max_leaves=20,
)


def decode_or_failure(decode: Any, data: bytes) -> str:
    """Return the repr of what `decode` gives for `data`, or 'failed'."""
    try:
        return repr(decode(data))
    except Exception:
        return "failed"


@given(st.one_of(msgpack_values.map(codec.pack), st.binary(max_size=40)))
def test_unpack_matches_full_options(data: bytes) -> None:
    """unpack leaves the options that are msgpack's defaults out, and decodes
    every input, valid or not, exactly as the full option set does."""

    def with_all_options(raw: bytes) -> Any:
        return msgpack.unpackb(raw, **codec._unpacker_options)

    assert decode_or_failure(codec.unpack, data) == decode_or_failure(
        with_all_options, data
    )


def test_unpack_omitted_options_are_defaults() -> None:
    """Each option unpack leaves out behaves as `_unpacker_options` sets it."""
    assert set(codec._unpacker_options) - {"ext_hook"} == codec._OPTIONS_AT_DEFAULTS
    assert codec.unpack(codec.pack("a")) == "a"  # raw=False
    assert type(codec.unpack(codec.pack((1,)))) is list  # use_list=True
    with pytest.raises(MalformedBody):
        codec.unpack(codec.pack({1: 1}))  # strict_map_key=True
    stamp = msgpack.Timestamp(1, 2)
    assert codec.unpack(codec.pack(stamp)) == stamp  # timestamp=0


@given(json_values)
def test_check_value_accepts_model(value: Any) -> None:
    """check_value accepts every JSON-model value within the depth limit."""
    codec.check_value(value, "payload")


def test_round_trip_int_bounds() -> None:
    """The smallest and largest accepted integers survive a round trip."""
    for number in (INT_MIN, INT_MAX, -1, 0, 2**53):
        assert codec.unpack(codec.pack(number)) == number


def test_tuple_packs_as_list() -> None:
    """pack writes a tuple as an array, which unpack returns as a list."""
    assert codec.unpack(codec.pack((1, "a"))) == [1, "a"]


# check_value: depth.


def test_depth_max_accepted() -> None:
    """A value inside DEPTH_MAX nested lists or maps is accepted."""
    codec.check_value(nest_lists(DEPTH_MAX), "payload")
    codec.check_value(nest_maps(DEPTH_MAX), "payload")


def test_depth_over_max_rejected() -> None:
    """A value inside DEPTH_MAX + 1 nested lists is rejected."""
    message = rejection_message(nest_lists(DEPTH_MAX + 1))
    assert f"more than {DEPTH_MAX} levels" in message
    assert message.startswith("payload" + "[0]" * (DEPTH_MAX + 1) + " ")


def test_map_depth_over_max_rejected() -> None:
    """A value inside DEPTH_MAX + 1 nested maps is rejected."""
    message = rejection_message(nest_maps(DEPTH_MAX + 1))
    assert f"more than {DEPTH_MAX} levels" in message
    assert message.startswith("payload" + ".k" * (DEPTH_MAX + 1) + " ")


def test_empty_container_over_max_rejected() -> None:
    """An empty list one level past the limit is rejected like a scalar."""
    value: Any = []
    for _ in range(DEPTH_MAX + 1):
        value = [value]
    rejection_message(value)


# check_value: scalars.


@pytest.mark.parametrize("number", [INT_MIN, INT_MAX, 0, -1, 2**63])
def test_int_in_range_accepted(number: int) -> None:
    """Integers from -2**63 to 2**64 - 1 are accepted."""
    codec.check_value(number, "payload")


@pytest.mark.parametrize("number", [INT_MIN - 1, INT_MAX + 1, 2**100, -(2**100)])
def test_int_out_of_range_rejected(number: int) -> None:
    """Integers outside [-2**63, 2**64 - 1] are rejected with the value shown."""
    message = rejection_message({"n": number})
    assert message.startswith("payload.n ")
    assert str(number) in message


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_float_rejected(number: float) -> None:
    """NaN and the infinities are rejected."""
    message = rejection_message({"x": [number]})
    assert message.startswith("payload.x[0] ")
    assert "finite" in message


def test_lone_surrogate_value_rejected() -> None:
    """A string value with a lone surrogate is rejected with its position."""
    message = rejection_message({"name": "ab\ud800"})
    assert message.startswith("payload.name ")
    assert "surrogate" in message
    assert "position 2" in message


def test_lone_surrogate_key_rejected() -> None:
    """A map key with a lone surrogate is rejected, naming the map."""
    message = rejection_message({"a": {"\udc00x": 1}})
    assert message.startswith("payload.a key ")
    assert "surrogate" in message


def test_paired_surrogates_accepted() -> None:
    """A character outside the BMP, written as one code point, is accepted."""
    codec.check_value({"\U0001f600": "\U0001f600"}, "payload")


@pytest.mark.parametrize("key", [1, True, None, 1.5, (1, 2), b"k"])
def test_non_string_key_rejected(key: Any) -> None:
    """A map key that is not a string is rejected with its type named."""
    message = rejection_message({"a": {key: 1}})
    assert message.startswith("payload.a ")
    assert type(key).__name__ in message


@pytest.mark.parametrize(
    "value",
    [
        b"bytes",
        bytearray(b"x"),
        (1, 2),
        {1, 2},
        Decimal("1.5"),
        object(),
        datetime.datetime(2024, 1, 1),
        msgpack.ExtType(5, b"x"),
        msgpack.Timestamp(1, 0),
    ],
)
def test_non_model_type_rejected(value: Any) -> None:
    """Values outside the JSON model, tuples included, are rejected by type."""
    message = rejection_message({"a": value})
    assert message.startswith("payload.a ")
    assert type(value).__name__ in message


def test_subclass_rejected() -> None:
    """A subclass of str is rejected, because only exact JSON types pass."""

    class Name(str):
        pass

    message = rejection_message([Name("x")])
    assert "Name" in message


def test_error_names_nested_path() -> None:
    """The message names the exact path of the bad value."""
    payload = {"a": {"b": [0, 1, math.nan]}}
    message = rejection_message(payload)
    assert message.startswith("payload.a.b[2] ")


def test_error_path_uses_field_argument() -> None:
    """The path starts with the field name the caller passes."""
    message = rejection_message([b"x"], field="items")
    assert message.startswith("items[0] ")


# unpack: rejected input.


def test_unpack_rejects_ext_type() -> None:
    """An application extension type is rejected with MalformedBody."""
    error = unpack_error(msgpack.packb(msgpack.ExtType(5, b"x")))
    assert "extension type 5" in error.message


def test_unpack_rejects_nested_ext_type() -> None:
    """An extension type inside a map is rejected too."""
    data = msgpack.packb({"a": [msgpack.ExtType(0, b"")]})
    unpack_error(data)


@pytest.mark.parametrize(
    "data",
    [
        b"\xd6\xff" + (1).to_bytes(4, "big"),  # 32-bit timestamp
        b"\xd7\xff" + (1).to_bytes(8, "big"),  # 64-bit timestamp
        b"\xc7\x0c\xff" + (0).to_bytes(4, "big") + (1).to_bytes(8, "big"),  # 96-bit
    ],
    ids=["timestamp32", "timestamp64", "timestamp96"],
)
def test_unpack_checked_rejects_timestamp_ext(data: bytes) -> None:
    """The msgpack timestamp extension (type -1) is rejected with MalformedBody."""
    with pytest.raises(MalformedBody):
        codec.unpack_checked(data, "body")


def test_unpack_checked_rejects_packed_datetime() -> None:
    """A datetime that msgpack wrote as a timestamp is rejected."""
    moment = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    with pytest.raises(MalformedBody) as raised:
        codec.unpack_checked(msgpack.packb({"at": moment}, datetime=True), "body")
    assert "body.at" in raised.value.message


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x01",  # an array of two with one item
        b"\xa5abc",  # a string cut short
        b"\x01\x02",  # two values where one is expected
        b"\xa2\xff\xfe",  # a string that is not UTF-8
        b"\x81\x01\x02",  # a map with an integer key
        b"\x81\x91\x01\x02",  # a map with an array key
        b"\xdd\xff\xff\xff\xff",  # an array claiming 2**32 - 1 items
    ],
)
def test_unpack_rejects_bad_bytes(data: bytes) -> None:
    """Bytes that are not exactly one valid msgpack value raise MalformedBody."""
    error = unpack_error(data)
    assert error.message.startswith("body is not valid msgpack")


def test_unpack_rejects_deep_nesting() -> None:
    """Arrays nested beyond msgpack's decoder stack raise MalformedBody."""
    unpack_error(b"\x91" * 5000 + b"\x90")


@given(json_values, st.data())
def test_unpack_rejects_truncation(value: Any, data: st.DataObject) -> None:
    """Every strict prefix of a packed value raises MalformedBody."""
    packed = codec.pack(value)
    cut = data.draw(st.integers(0, len(packed) - 1))
    unpack_error(packed[:cut])


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_unpack_garbage_raises_malformed(data: bytes) -> None:
    """Arbitrary bytes either decode or raise MalformedBody, never another error."""
    with contextlib.suppress(MalformedBody):
        codec.unpack(data)


def test_new_unpacker_rejects_ext_type() -> None:
    """The streaming unpacker applies the same extension rule as unpack."""
    unpacker = codec.new_unpacker(buffer_bytes_max=1024)
    unpacker.feed(codec.pack({"a": 1}) + msgpack.packb(msgpack.ExtType(5, b"x")))
    assert next(unpacker) == {"a": 1}
    with pytest.raises(MalformedBody):
        next(unpacker)
