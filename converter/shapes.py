"""Checks that parsed JSON has the shape the code reads, so a foreign answer or record (a proxy's
page, another API's JSON, a hand-edited file) is one clear error instead of a KeyError.

Standard library only: the publishing job's evidence check uses it too.
"""

from __future__ import annotations


def shape_problem(value, shape) -> str | None:
    """The first way `value` (parsed JSON) differs from `shape`, or None.

    `shape` is a type (str, int, bool, float), a dict of field -> shape (`name?`: the field may
    be absent or null), or a one-element list [shape] for an array of such values.
    """
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{_kind(value)} instead of an array"
        for n, item in enumerate(value):
            if problem := shape_problem(item, shape[0]):
                return f"item {n}: {problem}"
        return None
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{_kind(value)} instead of an object"
        for key, kind in shape.items():
            name = key.rstrip("?")
            if value.get(name) is None:
                if key.endswith("?"):
                    continue
                return f"{name!r} missing"
            if problem := shape_problem(value[name], kind):
                return f"{name!r}: {problem}"
        return None
    # bool is an int in Python; a JSON `true` is not an id.
    if not isinstance(value, shape) or (shape is int and isinstance(value, bool)):
        return f"{_kind(value)}, not {_JSON_NAMES[shape]}"
    return None


_JSON_NAMES = {int: "an integer", str: "a string", bool: "true/false", float: "a number"}


def _kind(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "true/false"}
    if value is None:
        return "null"
    return names.get(type(value), "a number")
