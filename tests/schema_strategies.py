"""Hypothesis strategies from a JSON schema (a pydantic model's `model_json_schema()`), and hostile JSON values.

`schema_values` draws values of the schema's types: what a client that read the schema would send. Its numbers
stay near the values a request uses, so that many bodies are valid and reach the engine; the values that no
schema-reading client sends (wrong types, NaN, huge and negative numbers, deep nesting, lone surrogates) come
from `hostile_values`, which a caller mixes in where it wants them.
"""
from __future__ import annotations

from hypothesis import strategies as st

# Past this many nested `$ref`s a schema value is null: chat message parts refer to each other without end.
MOST_REFS = 3
INT64 = 2**63
EDGE_INTS = (-1, 0, 1, 2**31 - 1, 2**31, INT64 - 1, INT64, -INT64, -INT64 - 1, 10**30)
EDGE_FLOATS = (0.0, -0.0, 1e-300, 1e308, -1e308, float("nan"), float("inf"), float("-inf"))


def schema_values(schema: dict, defs: dict, refs: int = 0) -> st.SearchStrategy:
    """Values that have the types `schema` names (a property of a request model, or the whole model)."""
    if "$ref" in schema:
        if refs >= MOST_REFS:
            return st.none()
        return schema_values(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, refs + 1)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    options = schema.get("anyOf") or schema.get("oneOf")
    if options:
        return st.one_of([schema_values(option, defs, refs) for option in options])
    kind = schema.get("type")
    if isinstance(kind, list):
        return st.one_of([schema_values(schema | {"type": k}, defs, refs) for k in kind])
    return _BY_TYPE.get(kind, _any_json)(schema, defs, refs)


def _integers(schema: dict, defs: dict, refs: int) -> st.SearchStrategy:
    low = schema.get("minimum", -INT64 - 1)
    high = schema.get("maximum", 10**30)
    edges = [v for v in EDGE_INTS if low <= v <= high]
    near = st.integers(max(low, -2), min(high, 24))
    return st.one_of(near, st.sampled_from(edges)) if edges else near


def _numbers(schema: dict, defs: dict, refs: int) -> st.SearchStrategy:
    return st.one_of(st.floats(0.0, 2.0), st.floats(-1e6, 1e6), st.integers(-2, 4))


def _strings(schema: dict, defs: dict, refs: int) -> st.SearchStrategy:
    low = schema.get("minLength", 0)
    return st.text(st.characters(codec="utf-8"), min_size=low, max_size=max(low, min(schema.get("maxLength", 24), 24)))


def _arrays(schema: dict, defs: dict, refs: int) -> st.SearchStrategy:
    items = schema_values(schema.get("items", {}), defs, refs)
    return st.lists(items, max_size=min(schema.get("maxItems", 4), 4))


def _objects(schema: dict, defs: dict, refs: int) -> st.SearchStrategy:
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    fixed = st.fixed_dictionaries(
        {name: schema_values(p, defs, refs) for name, p in properties.items() if name in required},
        optional={name: schema_values(p, defs, refs) for name, p in properties.items() if name not in required})
    extra = schema.get("additionalProperties")
    if not extra:
        return fixed
    values = _any_json(schema, defs, refs) if extra is True else schema_values(extra, defs, refs)
    more = st.dictionaries(st.text(max_size=8), values, max_size=3)
    return st.builds(lambda more, fixed: more | fixed, more, fixed)


def _any_json(schema: dict, defs: dict, refs: int) -> st.SearchStrategy:
    """Any JSON value (a schema without a type, or `additionalProperties: true`)."""
    leaves = st.none() | st.booleans() | st.integers(-3, 100) | st.floats(-10, 10) | st.text(max_size=8)
    return st.recursive(leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                                          inner, max_size=3),
                        max_leaves=6)


_BY_TYPE = {"integer": _integers, "number": _numbers, "string": _strings, "array": _arrays, "object": _objects,
            "boolean": lambda schema, defs, refs: st.booleans(), "null": lambda schema, defs, refs: st.none()}


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """Values from the strategies given with their weights (`st.one_of` would weigh each branch of a nested
    `one_of` alike), shrinking towards the first."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(lambda s: s)


def lone_surrogate_text() -> st.SearchStrategy:
    """Text with a UTF-16 surrogate half in it: valid as a JSON `\\ud800` escape, not encodable as UTF-8."""
    return st.builds(lambda a, s, b: a + s + b, st.text(max_size=4), st.characters(categories=["Cs"]),
                     st.text(max_size=4))


def nested(depth: int, leaf=0):
    """A list nested `depth` levels deep around `leaf`."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def hostile_values() -> st.SearchStrategy:
    """Values that a field's schema does not allow, or allows only at its edges."""
    return st.one_of(
        st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_FLOATS), st.none(), st.booleans(),
        st.text(max_size=12), lone_surrogate_text(), st.sampled_from(["", "ün", "\x00", "😀" * 3, "-1", "NaN"]),
        st.builds(nested, st.sampled_from([2, 30, 900])),
        st.lists(st.integers(-10**6, 10**6), max_size=5),
        st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
        _any_json({}, {}, 0))
