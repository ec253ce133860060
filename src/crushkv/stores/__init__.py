"""KV stores (``store=`` spec key): where a compressed layer's keys and values live. See ``stores.base``."""

from __future__ import annotations

from crushkv.stores.base import KVStore, Pages, QuantSlots, grown
from crushkv.stores.dense import DenseStore
from crushkv.stores.paged import BlockPool, PagedStore
from crushkv.stores.quant import QuantScratch, QuantStore
from crushkv.stores.tier import LowTier

STORES = ("dense", "paged")

__all__ = [
    "STORES",
    "BlockPool",
    "DenseStore",
    "KVStore",
    "LowTier",
    "PagedStore",
    "Pages",
    "QuantScratch",
    "QuantSlots",
    "QuantStore",
    "grown",
]
