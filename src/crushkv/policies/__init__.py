"""Policy registry and spec strings.

A spec is ``host[+adakv][+kvcrush][:key=value,...]``, e.g. ``h2o:budget=512,recent=32`` or
``snapkv+kvcrush:budget=1024,crush=0.25,anchor=alternate,granularity=block,block=32``. Integers are token counts,
floats are ratios/fractions, ``true``/``false`` are booleans. Each key goes to the first of host, ``adakv``,
``kvcrush`` that has it; ``kvcrush.seed=`` names the part explicitly (``random+kvcrush`` has a ``seed`` in both).
A key given twice is an error.
"""

from __future__ import annotations

import dataclasses
import typing

from crushkv.policies import (  # noqa: F401  (registration)
    expected_attention,
    full,
    h2o,
    keydiff,
    knorm,
    kvzip,
    lagkv,
    pyramidkv,
    random,
    snapkv,
    streaming,
    tova,
)
from crushkv.policies.adakv import AdaKV
from crushkv.policies.base import REGISTRY, Host, Policy, Wrapper
from crushkv.policies.kvcrush import KVCrush

#: wrappers in the order they nest (inner first): ``snapkv+adakv+kvcrush`` is KVCrush(AdaKV(SnapKV))
WRAPPERS: dict[str, type[Wrapper]] = {"adakv": AdaKV, "kvcrush": KVCrush}
#: keys ``full`` accepts (it keeps everything; only where it keeps it can be chosen)
STORAGE_KEYS = ("store", "page", "quant", "group", "residual")
#: keys whose values are keywords, matched case-insensitively
LOWERCASE_KEYS = ("store", "quant", "tier", "reps", "anchor", "pick", "granularity", "phase", "norm", "pool")

__all__ = [
    "REGISTRY",
    "WRAPPERS",
    "AdaKV",
    "Host",
    "KVCrush",
    "Policy",
    "Wrapper",
    "available_policies",
    "parse_policy",
]


def available_policies() -> list[str]:
    """Registered host policy names (each also combines as ``<name>+kvcrush`` / ``+adakv`` except ``full``)."""
    return sorted(REGISTRY)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "host"]


def _convert(raw: str, annotation: object, key: str, where: str) -> object:
    """Turn the text of a spec value into the field's type."""
    text = raw.strip()
    kinds = set(typing.get_args(annotation)) or {annotation}
    names = {getattr(k, "__name__", str(k)) for k in kinds}
    if "bool" in names or annotation in (bool, "bool"):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{where}: {key} must be true or false, got {raw!r}")
    try:
        if "int" in names and "float" in names:
            return float(text) if any(c in text for c in ".eE") else int(text)
        if "int" in names:
            return int(text)
        if "float" in names:
            return float(text)
    except ValueError:
        if "str" in names:  # a number or a keyword (``interval=auto``); the policy validates the keyword
            return text.lower()
        raise ValueError(f"{where}: {key} must be a number, got {raw!r}") from None
    return text.lower() if key in LOWERCASE_KEYS else text


def _annotations(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in _field_names(cls)}


def parse_policy(spec: str | Policy) -> Policy:
    """Build a policy from a spec string (a policy object is returned unchanged).

    Raises ``ValueError`` listing the valid names or keys when the spec names something unknown.
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a policy spec must be a non-empty string, got {spec!r}")
    head, _, tail = spec.strip().partition(":")
    names = [n.strip().lower() for n in head.split("+")]
    host_name, wrappers = names[0], names[1:]
    if host_name in WRAPPERS:
        raise ValueError(f"{host_name} wraps a host policy: write e.g. 'h2o+{host_name}:budget=512'")
    if host_name not in REGISTRY:
        raise ValueError(f"unknown policy {host_name!r}; valid policies: {', '.join(available_policies())}")
    known = list(WRAPPERS)
    if any(w not in WRAPPERS for w in wrappers) or wrappers != sorted(set(wrappers), key=known.index):
        raise ValueError(
            f"unknown policy combination {head!r}; wrappers are {' and '.join('+' + w for w in known)}, "
            "each at most once and in that order (e.g. snapkv+adakv+kvcrush)"
        )
    host_cls = REGISTRY[host_name]
    layers: list[tuple[str, dict[str, object]]] = [(host_name, _annotations(host_cls))]
    layers += [(w, _annotations(WRAPPERS[w])) for w in wrappers]
    if not host_cls.compresses:
        layers[0] = (host_name, {k: v for k, v in layers[0][1].items() if k in STORAGE_KEYS})
    kwargs: dict[str, dict[str, object]] = {name: {} for name, _ in layers}
    given: set[str] = set()
    for item in filter(None, (p.strip() for p in tail.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            raise ValueError(f"{head}: expected key=value, got {item!r}")
        if key in given:
            raise ValueError(f"{head}: key {key!r} given twice")
        given.add(key)
        part, dot, field = key.rpartition(".")
        if dot:
            owner = next(((name, types) for name, types in layers if name == part and field in types), None)
            if owner is None:
                raise ValueError(f"{head}: unknown key {key!r} (no part {part!r} with a key {field!r})")
            name, types = owner
            kwargs[name][field] = _convert(value, types[field], field, head)
            continue
        owner = next(((name, types) for name, types in layers if key in types), None)
        if owner is None:
            if not host_cls.compresses:
                raise ValueError(f"{host_name} keeps every token: it takes no {key!r} (only {', '.join(STORAGE_KEYS)})")
            valid = sorted({k for _, types in layers for k in types})
            raise ValueError(f"{head}: unknown key {key!r}; valid keys: {', '.join(valid)}")
        name, types = owner
        kwargs[name][key] = _convert(value, types[key], key, head)
    policy: Policy = host_cls(**kwargs[host_name])
    for w in wrappers:
        policy = WRAPPERS[w](host=policy, **kwargs[w])
    return policy
