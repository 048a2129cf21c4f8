"""The checkpoint state codec: round trips keep values and types, errors name paths,
and decoding a tampered text never unpickles or runs anything."""

from __future__ import annotations

import base64
import collections
import copy
import dataclasses
import datetime
import decimal
import enum
import json
import math
import pickle
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isobranch.checkpoint.codec import MAX_DEPTH, TAG_KEY, Tag, decode_value, encode_value
from isobranch.errors import StateDecodeError, StateEncodeError

HYPOTHESIS = settings(max_examples=150, deadline=None, database=None, derandomize=True)


def assert_same(original, decoded, where="value"):
    """Equal and of the same type at every level; dict order kept; -0.0 and nan too."""
    assert type(decoded) is type(original), f"{where}: {type(decoded)} is not {type(original)}"
    if type(original) is float:
        if math.isnan(original):
            assert math.isnan(decoded), where
        else:
            assert decoded == original, where
            assert math.copysign(1.0, decoded) == math.copysign(1.0, original), where
    elif type(original) in (list, tuple):
        assert len(decoded) == len(original), where
        for index, (a, b) in enumerate(zip(original, decoded, strict=True)):
            assert_same(a, b, f"{where}[{index}]")
    elif type(original) is dict:
        assert len(decoded) == len(original), where
        for (k1, v1), (k2, v2) in zip(original.items(), decoded.items(), strict=True):
            assert_same(k1, k2, f"{where} key {k1!r}")
            assert_same(v1, v2, f"{where}[{k1!r}]")
    elif type(original) in (set, frozenset):
        assert len(decoded) == len(original), where
        by_value = {element: element for element in original}
        for element in decoded:
            assert_same(by_value[element], element, f"{where}{{{element!r}}}")
    else:
        assert decoded == original, where


def round_trip(value, **options):
    return decode_value(encode_value(value, **options), **options)


# --- strategies ----------------------------------------------------------------------

LOOKALIKES = st.sampled_from([TAG_KEY, "v", *[tag.value for tag in Tag],
                              '{"$ib": "tuple", "v": []}', "NaN", "Infinity", "-0.0", ""])
TEXT = (st.text(max_size=8) | LOOKALIKES
        | st.text(st.characters(codec=None, exclude_categories=()), max_size=4))  # lone surrogates
# Around the 600 digits beyond which ints are tagged, and far beyond (below the 4300 digits
# that Python still prints, so that a failing example can be shown).
BIG_INTS = st.builds(lambda digits, offset, sign: sign * (10**digits + offset),
                     st.sampled_from([599, 600, 601, 4000]), st.integers(-1, 1), st.sampled_from([1, -1]))
SCALARS = (st.none() | st.booleans() | st.integers() | BIG_INTS | st.floats(allow_nan=False)
           | st.sampled_from([0.0, -0.0, math.inf, -math.inf]) | TEXT | st.binary(max_size=8))
HASHABLE = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3).map(tuple) | st.frozensets(inner, max_size=3),
    max_leaves=6)
VALUE_LEAVES = SCALARS | st.just(math.nan) | st.binary(max_size=8).map(bytearray)


def _containers(inner):
    return (st.lists(inner, max_size=4)
            | st.lists(inner, max_size=3).map(tuple)
            | st.dictionaries(TEXT, inner, max_size=4)
            | st.dictionaries(HASHABLE, inner, max_size=3)
            | st.sets(HASHABLE, max_size=3)
            | st.frozensets(HASHABLE, max_size=3))


VALUES = st.recursive(VALUE_LEAVES, _containers, max_leaves=25)
JSON_NATIVE = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=6).filter(lambda key: key != TAG_KEY), inner, max_size=4),
    max_leaves=25)


# --- round trips -----------------------------------------------------------------------

@HYPOTHESIS
@given(VALUES)
def test_every_supported_value_comes_back_equal_and_of_the_same_types(value):
    before = copy.deepcopy(value)
    text = encode_value(value)
    assert_same(before, value)  # encoding leaves the input as it was
    json.loads(text, parse_constant=pytest.fail)  # strict JSON: no NaN or Infinity tokens
    assert_same(value, decode_value(text))


@HYPOTHESIS
@given(st.dictionaries(TEXT, VALUES, max_size=5))
def test_states_come_back_equal_with_pickle_allowed_too(state):
    # Pickling changes nothing for supported values: the text is the same.
    assert_same(state, round_trip(state, allow_pickle=True))
    assert encode_value(state, allow_pickle=True) == encode_value(state)


@HYPOTHESIS
@given(JSON_NATIVE)
def test_json_native_values_are_written_as_plain_json(value):
    assert encode_value(value) == json.dumps(value, separators=(",", ":"))
    assert_same(value, decode_value(encode_value(value)))


@pytest.mark.parametrize("value", [
    (), (1, "a", None), [(1, 2), [3, (4,)]], b"", b"\x00\xff", bytearray(b"ab"), set(), {1, "1", (1,)},
    frozenset(), frozenset({frozenset({1})}), {7: "a", 2.5: "b", None: "c", True: "d", (1, 2): "e",
                                               b"k": "f", frozenset({3}): "g", "s": "h"},
    {TAG_KEY: 1}, {TAG_KEY: "tuple", "v": [1, 2]}, {"nested": {TAG_KEY: {TAG_KEY: 2}}},
    -0.0, [-0.0, 0.0], math.inf, -math.inf, {"x": [math.inf, {"y": -math.inf}]},
    10**600 - 1, 10**600, -(10**601), 2**13000, True, False, 1, 1.0, [True, 1, 1.0, None],
    "\ud800", {"\udfff": "\ud83d"},
])
def test_examples_of_each_tag_round_trip(value):
    assert_same(value, round_trip(value))


def test_nan_round_trips_wherever_it_is():
    decoded = round_trip({"a": math.nan, "b": [math.nan], "c": (math.nan,), 1: {math.nan}})
    assert math.isnan(decoded["a"]) and math.isnan(decoded["b"][0]) and math.isnan(decoded["c"][0])
    assert math.isnan(next(iter(decoded[1])))


def test_dict_key_order_is_kept_when_keys_are_not_strings():
    state = {3: "c", "b": 2, 1: "a", (0,): None, TAG_KEY: 0}
    assert list(round_trip(state)) == [3, "b", 1, (0,), TAG_KEY]


def test_big_ints_round_trip_under_the_strictest_int_digit_limit():
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(640)
    try:
        for value in (10**639, 10**641, -(10**5000)):
            assert_same(value, round_trip(value))
    finally:
        sys.set_int_max_str_digits(limit)


def test_the_same_list_twice_comes_back_as_two_equal_lists():
    shared = [1, 2]
    decoded = round_trip({"a": shared, "b": shared})
    assert decoded == {"a": [1, 2], "b": [1, 2]} and decoded["a"] is not decoded["b"]


def test_decoding_accepts_utf8_bytes():
    assert decode_value(encode_value({"é": (1,)}).encode("utf-8")) == {"é": (1,)}


def test_threads_decode_and_encode_at_once_without_mixing_results():
    states = [{"n": n, "t": (n, str(n)), n: {n}} for n in range(8)]
    texts = [encode_value(state) for state in states]
    failures = []

    def work(index: int) -> None:
        for _ in range(300):
            if decode_value(texts[index]) != states[index] or encode_value(states[index]) != texts[index]:
                failures.append(index)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(states))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


# --- what cannot be encoded ------------------------------------------------------------

class Opaque:
    """A custom class; equal to any other Opaque so pickled copies compare equal."""

    def __eq__(self, other):
        return type(other) is Opaque

    def __hash__(self):
        return 1

    def __repr__(self):
        return "Opaque()"


@dataclasses.dataclass(frozen=True)
class Point:
    x: int
    y: float


class Colour(enum.IntEnum):
    RED = 1


class Word(str):
    pass


WHEN = datetime.datetime(2024, 5, 1, 12, 30)


@pytest.mark.parametrize(("state", "path", "type_name"), [
    ({"docs": [{}, {}, {}, {"when": WHEN}]}, "state['docs'][3]['when']", "datetime.datetime"),
    ({"t": (1, 2, Opaque())}, "state['t'][2]", "test_checkpoint_codec.Opaque"),
    ({"s": {1, Opaque()}}, "state['s']{Opaque()}", "Opaque"),
    ({"f": frozenset({(1, Opaque())})}, "state['f']{(1, Opaque())}[1]", "Opaque"),
    ({"m": {1: [0, Point(1, 2.0)]}}, "state['m'][1][1]", "Point"),
    ({"m": {Opaque(): 1}}, "state['m'][Opaque()]", "Opaque"),
    ({"c": Colour.RED}, "state['c']", "Colour"),
    ({"od": collections.OrderedDict(a=1)}, "state['od']", "OrderedDict"),
    ({"dd": [collections.defaultdict(list)]}, "state['dd'][0]", "defaultdict"),
    ({Word("k"): 1}, "state[" + repr(Word("k")) + "]", "Word"),
    ({"d": decimal.Decimal("1.5")}, "state['d']", "decimal.Decimal"),
    ({"x": 1j}, "state['x']", "complex"),
    (Opaque(), "state", "Opaque"),
])
def test_an_unsupported_value_is_refused_naming_its_path_and_type(state, path, type_name):
    with pytest.raises(StateEncodeError) as caught:
        encode_value(state)
    assert caught.value.path == path
    assert str(caught.value).startswith(path + ": ")
    assert type_name in str(caught.value)
    assert "pickle=True" in str(caught.value)


def test_the_error_says_when_a_key_is_at_fault_and_when_a_subclass_is():
    with pytest.raises(StateEncodeError, match="a dict key"):
        encode_value({"m": {Opaque(): 1}})
    with pytest.raises(StateEncodeError, match="subclass of dict"):
        encode_value({"od": collections.OrderedDict()})
    with pytest.raises(StateEncodeError) as caught:
        encode_value({"when": WHEN})
    assert "subclass" not in str(caught.value)


def test_an_encode_error_survives_pickling_with_its_path():
    with pytest.raises(StateEncodeError) as caught:
        encode_value({"when": WHEN})
    copied = pickle.loads(pickle.dumps(caught.value))
    assert (type(copied), copied.path, str(copied)) == (StateEncodeError, "state['when']",
                                                        str(caught.value))


def test_the_path_starts_with_the_name_given():
    with pytest.raises(StateEncodeError) as caught:
        encode_value({"x": [WHEN]}, path="result['branch-3']")
    assert caught.value.path == "result['branch-3']['x'][0]"


# --- depth and self-reference ----------------------------------------------------------

def nested(levels: int, make=lambda inner: [inner], leaf=0):
    value = leaf
    for _ in range(levels):
        value = make(value)
    return value


ONE_LEVEL = {
    "list": lambda inner: [inner],
    "dict": lambda inner: {"k": inner},
    "tuple": lambda inner: (inner,),
    "int-keyed dict": lambda inner: {1: inner},
    "escaped dict": lambda inner: {TAG_KEY: inner},
    "frozenset": lambda inner: frozenset({inner}),
}


def mixed(levels: int):
    makers = [make for name, make in ONE_LEVEL.items() if name != "frozenset"]
    value = 1
    for level in range(levels):
        value = makers[level % len(makers)](value)
    return value


@pytest.mark.parametrize("build", [*(lambda levels, make=make: nested(levels, make, leaf=1)
                                     for make in ONE_LEVEL.values()), mixed],
                         ids=[*ONE_LEVEL, "mixed"])
def test_max_depth_nesting_round_trips_and_one_more_level_is_refused(build):
    deepest = build(MAX_DEPTH)
    assert_same(deepest, round_trip(deepest))
    with pytest.raises(StateEncodeError, match=f"deeper than {MAX_DEPTH} levels") as caught:
        encode_value(build(MAX_DEPTH + 1))
    assert caught.value.path.startswith("state[") or caught.value.path.startswith("state{")


def test_too_deep_names_the_path_of_the_level_that_is_too_deep():
    with pytest.raises(StateEncodeError) as caught:
        encode_value(nested(MAX_DEPTH + 5))
    assert caught.value.path == "state" + "[0]" * MAX_DEPTH


def self_dict():
    state = {"a": 1}
    state["me"] = state
    return state


def cycle_through_list():
    state = {"docs": [{"id": 1}]}
    state["docs"][0]["parent"] = state["docs"]
    return state


def cycle_through_tuple():
    inner: list = []
    holder = (inner,)
    inner.append(holder)
    return {"t": holder}


def cycle_through_escaped_dict():
    state = {"x": {1: None}}
    state["x"][1] = [state["x"]]
    return state


@pytest.mark.parametrize(("build", "path", "again"), [
    (self_dict, "state['me']", "state"),
    (cycle_through_list, "state['docs'][0]['parent']", "state['docs']"),
    (cycle_through_tuple, "state['t'][0][0]", "state['t']"),
    (cycle_through_escaped_dict, "state['x'][1][0]", "state['x']"),
])
def test_a_self_referencing_structure_is_an_error_naming_where_it_loops(build, path, again):
    for allow_pickle in (False, True):
        with pytest.raises(StateEncodeError, match="self-referencing") as caught:
            encode_value(build(), allow_pickle=allow_pickle)
        assert caught.value.path == path
        assert f"this is {again} again" in str(caught.value)


# --- pickle opt-in -----------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    WHEN, datetime.date(2020, 1, 2), Point(1, 2.5), Opaque(), Colour.RED, Word("w"), decimal.Decimal("2.5"),
    collections.OrderedDict(b=1, a=2), collections.defaultdict(list, {"k": [1]}), 1 + 2j,
    collections.Counter("aab"),
])
def test_with_pickle_other_values_round_trip_with_their_type(value):
    state = {"v": value, "in a tuple": (1, value), "plain": [1, "a"]}
    text = encode_value(state, allow_pickle=True)
    assert json.loads(text)["plain"] == [1, "a"]  # only the unsupported value is pickled
    decoded = decode_value(text, allow_pickle=True)
    assert_same(state, decoded)
    if isinstance(value, collections.defaultdict):
        assert decoded["v"].default_factory is list


def test_a_value_pickle_refuses_is_an_error_naming_its_path():
    with pytest.raises(StateEncodeError, match="cannot be pickled") as caught:
        encode_value({"fn": [lambda: 1]}, allow_pickle=True)
    assert caught.value.path == "state['fn'][0]"
    assert "function" in str(caught.value)


CALLS: list[str] = []


def record_call(marker: str) -> str:
    """What a tampered pickle calls: if it runs, CALLS says so."""
    CALLS.append(marker)
    return marker


class RunsCode:
    def __reduce__(self):
        return (record_call, ("ran",))


def hand_written(payload_bytes: bytes, wrap=lambda tagged: {"x": tagged}) -> str:
    tagged = {TAG_KEY: "pickle", "v": base64.b64encode(payload_bytes).decode("ascii")}
    return json.dumps(wrap(tagged))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch):
    """Any use of pickle's loaders fails the test (at teardown, whatever the codec caught)."""
    def refuse(*args, **kwargs):
        CALLS.append("unpickling")
        raise AssertionError("unpickling attempted")

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    CALLS.clear()
    yield
    assert CALLS == []


@pytest.mark.parametrize("wrap", [
    lambda tagged: tagged,
    lambda tagged: {"x": tagged},
    lambda tagged: {TAG_KEY: "tuple", "v": [1, tagged]},
    lambda tagged: {TAG_KEY: "dict", "v": [1, tagged]},
    lambda tagged: {TAG_KEY: "dict", "v": [{TAG_KEY: "tuple", "v": [tagged]}, 1]},
    lambda tagged: {TAG_KEY: "set", "v": [tagged]},
    lambda tagged: [[[tagged]]],
], ids=["top", "value", "in a tuple", "dict value", "in a key", "in a set", "in lists"])
def test_a_tampered_pickle_is_refused_without_pickle_and_runs_nothing(wrap, no_unpickling):
    text = hand_written(pickle.dumps(RunsCode()), wrap)
    with pytest.raises(StateDecodeError, match="pickle is off"):
        decode_value(text)


def test_the_tampered_payload_would_run_code_if_pickle_were_allowed():
    # The payload of the test above is real: with pickle allowed it calls record_call.
    CALLS.clear()
    assert decode_value(hand_written(pickle.dumps(RunsCode())), allow_pickle=True) == {"x": "ran"}
    assert CALLS == ["ran"]
    CALLS.clear()


def test_a_state_written_with_pickle_is_refused_by_a_reader_without_it(no_unpickling):
    text = encode_value({"when": WHEN}, allow_pickle=True)
    with pytest.raises(StateDecodeError, match=r"pickle=True"):
        decode_value(text)


def test_a_broken_pickle_is_a_decode_error_even_with_pickle_allowed():
    with pytest.raises(StateDecodeError, match="cannot be unpickled"):
        decode_value(hand_written(b"\x80\x05not a pickle"), allow_pickle=True)


# --- malformed text ------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "", "[1,", '{"a": 1} 2', "NaN", "[Infinity]", '{"x": -Infinity}', "'a'", "1" * 5000,
    "[" * 100_000 + "]" * 100_000,
    '{"$ib": "tuple"}', '{"$ib": "tuple", "v": [], "w": 1}', '{"$ib": "tuple", "w": []}',
    '{"$ib": "frobnicate", "v": 1}', '{"$ib": 5, "v": 1}', '{"$ib": ["tuple"], "v": []}',
    '{"$ib": null, "v": []}', '{"$ib": "tuple", "v": "ab"}', '{"$ib": "tuple", "v": {"a": 1}}',
    '{"$ib": "set", "v": [[1]]}', '{"$ib": "frozenset", "v": [{"a": 1}]}', '{"$ib": "set", "v": 1}',
    '{"$ib": "bytes", "v": 5}', '{"$ib": "bytes", "v": "!!!"}', '{"$ib": "bytes", "v": "é"}',
    '{"$ib": "bytearray", "v": "abc"}', '{"$ib": "dict", "v": [1]}', '{"$ib": "dict", "v": {"a": 1}}',
    '{"$ib": "dict", "v": [[1], 2]}', '{"$ib": "dict", "v": [1, 2, 1, 3]}',
    '{"$ib": "dict", "v": [{"$ib": "set", "v": []}, 1]}',
    '{"$ib": "float", "v": "1.5"}', '{"$ib": "float", "v": 1.5}', '{"$ib": "float", "v": "NaN"}',
    '{"$ib": "int", "v": "xyz"}', '{"$ib": "int", "v": 12}', '{"$ib": "int", "v": "1_0"}',
    '{"$ib": "int", "v": " 10"}', '{"$ib": "pickle", "v": 3}',
])
def test_malformed_or_tampered_text_is_a_decode_error(text, no_unpickling):
    with pytest.raises(StateDecodeError):
        decode_value(text)


@pytest.mark.parametrize("not_text", [None, 12, ["[]"], {"a": 1}])
def test_decoding_something_that_is_not_text_is_a_decode_error(not_text):
    with pytest.raises(StateDecodeError, match="expected stored JSON text"):
        decode_value(not_text)


def test_bytes_that_are_not_utf8_are_a_decode_error():
    with pytest.raises(StateDecodeError, match="UTF-8"):
        decode_value(b'"\xff"')


def test_every_tag_has_a_decoder_and_an_example_that_uses_it():
    seen = set()

    def collect(node):
        if isinstance(node, dict):
            if TAG_KEY in node:
                seen.add(node[TAG_KEY])
            for item in node.values():
                collect(item)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(json.loads(encode_value({
        "t": (1,), "s": {1}, "f": frozenset(), "b": b"", "ba": bytearray(), "d": {1: 2},
        "x": math.nan, "i": 10**700, "p": Opaque()}, allow_pickle=True)))
    assert seen == {tag.value for tag in Tag}
