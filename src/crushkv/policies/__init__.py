"""Policy registry and spec strings.

A spec is ``name[+kvcrush][:key=value,...]``, e.g. ``h2o:budget=512,recent=32`` or
``snapkv+kvcrush:budget=1024,crush=0.25,anchor=alternate,granularity=block,block=32``. Integers are token counts,
floats are ratios/fractions, ``true``/``false`` are booleans.
"""

from __future__ import annotations

import dataclasses
import typing

from crushkv.policies import full, h2o, knorm, pyramidkv, random, snapkv, streaming, tova  # noqa: F401  (registration)
from crushkv.policies.base import REGISTRY, Policy, Stats, StatsRequest
from crushkv.policies.kvcrush import KVCRUSH_FIELDS, KVCrush

AnyPolicy = Policy | KVCrush
#: KVCrush compresses at every decoding step by default, like H2O (OpenVINO GenAI's schedule)
KVCRUSH_DEFAULT_PHASE = "decode"

__all__ = ["REGISTRY", "AnyPolicy", "KVCrush", "Policy", "Stats", "StatsRequest", "available_policies", "parse_policy"]


def available_policies() -> list[str]:
    """Registered host policy names (each also combines as ``<name>+kvcrush`` except ``full``)."""
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
    return text


def _annotations(cls: type) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in _field_names(cls)}


def parse_policy(spec: str | AnyPolicy) -> AnyPolicy:
    """Build a policy from a spec string (a policy object is returned unchanged).

    Raises ``ValueError`` listing the valid names or keys when the spec names something unknown.
    """
    if isinstance(spec, (Policy, KVCrush)):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a policy spec must be a non-empty string, got {spec!r}")
    head, _, tail = spec.strip().partition(":")
    names = [n.strip().lower() for n in head.split("+")]
    host_name, wrappers = names[0], names[1:]
    if host_name == "kvcrush":
        raise ValueError("kvcrush wraps a host policy: write e.g. 'h2o+kvcrush:budget=512,crush=384'")
    if host_name not in REGISTRY:
        raise ValueError(f"unknown policy {host_name!r}; valid policies: {', '.join(available_policies())}")
    if wrappers not in ([], ["kvcrush"]):
        raise ValueError(f"unknown policy combination {head!r}; the only wrapper is '+kvcrush' (e.g. snapkv+kvcrush)")
    host_cls = REGISTRY[host_name]
    host_types = _annotations(host_cls)
    crush_types = {k: v for k, v in _annotations(KVCrush).items() if k in KVCRUSH_FIELDS} if wrappers else {}
    host_kwargs: dict[str, object] = {}
    crush_kwargs: dict[str, object] = {}
    for item in filter(None, (p.strip() for p in tail.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            raise ValueError(f"{head}: expected key=value, got {item!r}")
        if key in host_types:
            host_kwargs[key] = _convert(value, host_types[key], key, head)
        elif key in crush_types:
            crush_kwargs[key] = _convert(value, crush_types[key], key, head)
        else:
            valid = sorted(set(host_types) | set(crush_types))
            raise ValueError(f"{head}: unknown key {key!r}; valid keys: {', '.join(valid)}")
    if wrappers and "phase" not in host_kwargs:
        host_kwargs["phase"] = KVCRUSH_DEFAULT_PHASE
    host = host_cls(**host_kwargs)
    return KVCrush(host=host, **crush_kwargs) if wrappers else host
