"""HuJSON reading: comments, trailing commas, positions in errors, JSON5 extras refused."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.policy.errors import HuJSONError, PolicyError
from meshnode.policy.hujson import loads, standardize


def test_comments_and_trailing_commas() -> None:
    text = """{
      // line comment with "quotes" and a , comma
      "a": [1, 2, /* block */ 3,],   /* multi
      line */
      "b": {"url": "http://x//y", "c": "/* not a comment */",},
    }"""
    assert loads(text) == {"a": [1, 2, 3], "b": {"url": "http://x//y", "c": "/* not a comment */"}}


def test_standardize_keeps_length_and_lines() -> None:
    text = '{\n  // c\n  "a": 1, /* x\n y */\n}\n'
    plain = standardize(text)
    assert len(plain) == len(text)
    assert plain.count("\n") == text.count("\n")
    assert json.loads(plain) == {"a": 1}


def test_comma_in_string_before_bracket_is_kept() -> None:
    assert loads('["a,", "]"]') == ["a,", "]"]


def test_escaped_quote_in_string() -> None:
    assert loads(r'{"a": "say \"hi\" // not comment",}') == {"a": 'say "hi" // not comment'}


def test_bom_is_accepted() -> None:
    assert loads('\ufeff{"a": 1}') == {"a": 1}


@pytest.mark.parametrize("text, line, column, words", [
    ('{\n  "a": 1\n  "b": 2\n}', 3, 3, "delimiter"),
    ('{\n  a: 1\n}', 2, 3, "identifier"),                 # JSON5 unquoted key
    ("{\n  'a': 1\n}", 2, 3, "single-quoted"),            # JSON5 single quotes
    ('{"a": NaN}', 1, 7, "NaN"),
    ('{"a": Infinity}', 1, 7, "identifier"),
    ('{"a": +1}', 1, 7, "Expecting value"),               # JSON5 leading plus
    ('{"a": .5}', 1, 7, "Expecting value"),               # JSON5 leading decimal point
    ('{"a": 0x10}', 1, 8, "identifier"),                   # JSON5 hex
    ('{\n"a": 1, /* open', 2, 9, "unterminated"),
    ('{"a": "x\n"}', 1, 7, "unterminated string"),
    ('[1,,]', 1, 4, "unexpected ','"),
    ('', 1, 1, "Expecting value"),
    ('{"a": 1} x', 1, 10, "identifier"),
    ('{"a": 1}\n{"b": 2}', 2, 1, "Extra data"),
])
def test_errors_carry_line_and_column(text: str, line: int, column: int, words: str) -> None:
    with pytest.raises(HuJSONError) as info:
        loads(text)
    assert (info.value.line, info.value.column) == (line, column), str(info.value)
    assert words in str(info.value)
    assert isinstance(info.value, PolicyError)


def test_duplicate_key_is_refused_at_second_spelling() -> None:
    with pytest.raises(HuJSONError) as info:
        loads('{\n  "acls": [],\n  "acls": []\n}')
    assert "duplicate key 'acls'" in str(info.value)
    assert (info.value.line, info.value.column) == (3, 3)


def test_deep_nesting_is_an_error_not_a_crash() -> None:
    with pytest.raises(HuJSONError):
        loads("[" * 100000)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20)


def _decorate(value: object) -> str:
    """Serialize with a comment before every value and a trailing comma in every container."""
    if isinstance(value, list):
        items = "".join(f"/*i*/ {_decorate(v)},\n" for v in value)
        return f"[ // list\n{items}]"
    if isinstance(value, dict):
        items = "".join(f"{json.dumps(k)}: {_decorate(v)}, // k\n" for k, v in value.items())
        return "{" + items + "}"
    return json.dumps(value)


@given(json_values)
@settings(max_examples=200)
def test_decorated_json_reads_back(value: object) -> None:
    assert loads(_decorate(value)) == value


@given(st.text(max_size=60))
@settings(max_examples=500)
def test_random_text_parses_or_raises_huJSONError(text: str) -> None:
    try:
        loads(text)
    except HuJSONError as exc:
        assert exc.line is None or exc.line >= 1


@pytest.mark.parametrize("text, column", [("[,]", 2), ("{,}", 2), ('{"a": ,}', 7), ("[1,,2]", 4)])
def test_comma_without_value_is_refused(text: str, column: int) -> None:
    with pytest.raises(HuJSONError) as info:
        loads(text)
    assert info.value.column == column
