"""Typed configuration from plain mappings: dataclass fields declare their allowed range once.

`parse(cls, data, path)` turns a YAML mapping into a frozen dataclass, checking types, ranges,
choices and unknown keys; every error names the field by its dotted path and says what is allowed.
`json_schema(cls)` writes the same rules as JSON Schema, so the Helm chart's values.schema.json
checks operator values against exactly what the loader accepts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def spec(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    doc: str = "",
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with an allowed range (ge/le/gt) and a one-line description."""
    meta = {"ge": ge, "le": le, "gt": gt, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _range_text(meta: Mapping[str, Any]) -> str:
    lo = meta.get("ge")
    gt = meta.get("gt")
    hi = meta.get("le")
    left = f">= {lo}" if lo is not None else (f"> {gt}" if gt is not None else "")
    right = f"<= {hi}" if hi is not None else ""
    return " and ".join(p for p in (left, right) if p) or "any value"


def _check_range(value: float, meta: Mapping[str, Any], path: str) -> None:
    lo, hi, gt = meta.get("ge"), meta.get("le"), meta.get("gt")
    if (lo is not None and value < lo) or (hi is not None and value > hi) or (gt is not None and value <= gt):
        raise ConfigError(path, f"{value!r} is out of range; allowed: {_range_text(meta)}")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is dict or origin is Mapping:
        return "a mapping"
    if origin is tuple:
        return "a list"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(tp: Any, value: Any, meta: Mapping[str, Any], path: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, meta, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"{value!r} is not {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(path, f"{value!r} is not allowed; allowed: {', '.join(repr(c) for c in choices)}")
        return value
    if origin is dict or origin is Mapping:
        key_tp, val_tp = get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            key = _convert(key_tp, k, {}, _join(path, str(k)))
            out[key] = _convert(val_tp, v, meta, _join(path, str(k)))
        return out
    if origin is tuple:
        (item_tp, _ellipsis) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__}")
        return tuple(_convert(item_tp, v, meta, f"{path}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        _check_range(value, meta, path)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(path, f"expected a finite number, got {value!r}")
        _check_range(float(value), meta, path)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{path}: unsupported field type {tp!r}")


def parse(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from mapping `data`; raise ConfigError naming the field on any problem."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(_join(path, unknown[0]), f"unknown field; allowed: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], f.metadata, _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "is required")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if path and not exc.path.startswith(path):
            raise ConfigError(_join(path, exc.path), str(exc).split(": ", 1)[-1]) from None
        raise


def to_plain(obj: Any) -> Any:
    """A dataclass (with mapping proxies inside) as plain dicts and lists, e.g. for YAML output."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


def json_schema(cls: type) -> dict[str, Any]:
    """JSON Schema (draft 7 subset, as Helm uses) for dataclass `cls`, with the same ranges."""
    hints = get_type_hints(cls)
    props: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        props[f.name] = _type_schema(hints[f.name], f.metadata)
        if f.metadata.get("doc"):
            props[f.name]["description"] = f.metadata["doc"]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(f.name)
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def _type_schema(tp: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [_type_schema(a, meta) for a in get_args(tp)]}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin is dict or origin is Mapping:
        return {"type": "object", "additionalProperties": _type_schema(get_args(tp)[1], meta)}
    if origin is tuple:
        return {"type": "array", "items": _type_schema(get_args(tp)[0], meta)}
    if dataclasses.is_dataclass(tp):
        return json_schema(tp)
    if tp is type(None):
        return {"type": "null"}
    base = {bool: {"type": "boolean"}, int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}}.get(tp)
    if base is None:
        return {}
    base = dict(base)
    if tp in (int, float):
        if meta.get("ge") is not None:
            base["minimum"] = meta["ge"]
        if meta.get("gt") is not None:
            base["exclusiveMinimum"] = meta["gt"]
        if meta.get("le") is not None:
            base["maximum"] = meta["le"]
    return base
