"""A transformers 5.x ``Cache`` whose full-attention layers really shrink to the kept tokens.

``CompressedLayer`` stores kept keys/values compactly (``[B, kv_heads, kept, d]``, real storage freed on eviction)
together with each slot's logical position and a padding flag. It reports the *logical* length from
``get_seq_length`` (so transformers derives correct RoPE positions for new tokens) and the physical length plus the
offset between the two from ``get_mask_sizes``. Masks over the non-contiguous kept positions are rebuilt by
crushkv's attention function (``crushkv.attention``), which also queues each layer's eviction right after its
attention (``CrushCache.queue_eviction``).
Sliding-window layers (Gemma3) keep transformers' ``DynamicSlidingWindowLayer`` semantics and are not compressed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from crushkv.layer_stack import DEFER_MAX_BYTES, evict
from crushkv.policies import AnyPolicy, parse_policy

FULL_TYPES = ("full_attention",)
SLIDING_TYPES = ("sliding_attention",)


class CompressedLayer(DynamicLayer):
    """One full-attention layer: compact kept K/V plus slot metadata (positions, padding, policy state)."""

    is_croppable = False

    def __init__(self, policy: AnyPolicy, layer_idx: int, rank: int, num_compressed_layers: int) -> None:
        super().__init__()
        self.policy = policy
        self.layer_idx = layer_idx
        #: index among compressed layers and their count (PyramidKV's layer-wise budgets)
        self.rank = rank
        self.num_compressed_layers = num_compressed_layers
        self._clear()

    def _clear(self) -> None:
        self.positions: torch.Tensor | None = None  # [B, H, L] logical position of every slot
        self.valid: torch.Tensor | None = None  # [B, H, L] False for padding slots
        self.state: dict[str, torch.Tensor] = {}  # slot-aligned policy state, last dim = L
        self.extras: dict[object, object] = {}  # policy state that is not slot-aligned (anchors, generators)
        self.seen = 0  # logical length: tokens ever appended
        self.forwards = 0
        self.context_length = 0  # logical length after the first forward (the prompt)
        self.contiguous = True  # no eviction has happened yet

    # ------------------------------------------------------------------ transformers' layer API
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.keys = key_states.new_zeros(b, h, 0, key_states.shape[-1])
        self.values = value_states.new_zeros(b, h, 0, value_states.shape[-1])
        self.positions = torch.zeros(b, h, 0, dtype=torch.long, device=self.device)
        self.valid = torch.zeros(b, h, 0, dtype=torch.bool, device=self.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q = key_states.shape[:3]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new = torch.arange(self.seen, self.seen + q, device=self.device).expand(b, h, q)
        self.positions = torch.cat([self.positions, new], dim=-1)
        self.valid = torch.cat([self.valid, torch.ones(b, h, q, dtype=torch.bool, device=self.device)], dim=-1)
        self.state = {name: F.pad(t, (0, q)) for name, t in self.state.items()}
        self.seen += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int | torch.Tensor) -> tuple[int, int]:
        # transformers < 5.3 passes ``cache_position`` (the new tokens' positions), later versions the count.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        physical = self.physical_length
        return physical + query_length, self.seen - physical

    def reset(self) -> None:
        super().reset()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (evicted tokens cannot be restored)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.positions, self.valid = fn(self.positions), fn(self.valid)
        self.state = {name: fn(t) for name, t in self.state.items()}

    # ------------------------------------------------------------------ compression support
    @property
    def physical_length(self) -> int:
        return 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]

    @property
    def num_heads(self) -> int:
        return self.keys.shape[1]

    def accumulate(self, name: str, value: torch.Tensor) -> None:
        """Add slot-aligned ``value`` into ``state[name]`` (created on first use)."""
        current = self.state.get(name)
        self.state[name] = value.clone() if current is None else current + value

    def generator(self, seed: int) -> torch.Generator:
        """A CPU generator per (seed, layer), created once so draws are reproducible run to run."""
        key = ("generator", seed)
        if key not in self.extras:
            self.extras[key] = torch.Generator().manual_seed(seed * 1_000_003 + self.layer_idx)
        return self.extras[key]  # type: ignore[return-value]

    def prune(self, keep: torch.Tensor) -> None:
        """Keep only slots ``keep`` (``[B, H, k]``, ascending): new compact tensors, the old storage is released."""
        b, h, length = self.positions.shape
        # one flat row index per kept slot: index_select copies whole head_dim rows (about 10x faster than gather)
        rows = (keep + torch.arange(b * h, device=keep.device).view(b, h, 1) * length).flatten()
        self.keys = _take_rows(self.keys, rows, keep.shape)
        self.values = _take_rows(self.values, rows, keep.shape)
        self.positions = self.positions.reshape(-1).index_select(0, rows).view(keep.shape)
        self.valid = self.valid.reshape(-1).index_select(0, rows).view(keep.shape)
        self.state = {name: _gather_slots(t, keep) for name, t in self.state.items()}
        self.contiguous = False


def _take_rows(tensor: torch.Tensor, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Rows ``rows`` of ``[B, H, L, d]`` flattened to ``[B*H*L, d]``, shaped back to ``[*shape, d]``."""
    d = tensor.shape[-1]
    return tensor.reshape(-1, d).index_select(0, rows).view(*shape, d)


def _gather_slots(tensor: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Gather the last (slot) dim of ``[B, H, ..., L]`` with ``keep [B, H, k]``."""
    index = keep.view(*keep.shape[:2], *([1] * (tensor.dim() - 3)), keep.shape[-1])
    return tensor.gather(-1, index.expand(*tensor.shape[:-1], keep.shape[-1]))


def _layer_types(config) -> tuple[list[str], list[int | None]]:
    """Attention type and sliding window of every decoder layer."""
    n = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        uses_window = window is not None and getattr(config, "use_sliding_window", True)
        types = ["sliding_attention" if uses_window else "full_attention"] * n
    return list(types), [window if t in SLIDING_TYPES else None for t in types]


class CrushCache(Cache):
    """Cache for one ``crushkv.compress`` context: compressed full-attention layers, untouched sliding layers."""

    def __init__(self, config, policy: AnyPolicy | str) -> None:
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.policy = parse_policy(policy)
        types, windows = _layer_types(config)
        unknown = sorted({t for t in types if t not in FULL_TYPES + SLIDING_TYPES})
        if unknown:
            raise ValueError(
                f"unsupported attention layout {unknown}: crushkv compresses full-attention layers and keeps "
                "sliding-window layers; linear/chunked/MoE-only layers are not supported"
            )
        full = [i for i, t in enumerate(types) if t in FULL_TYPES]
        if not full:
            raise ValueError("this model has no full-attention layer to compress (all layers are sliding-window)")
        layers: list = []
        for i, (kind, window) in enumerate(zip(types, windows)):
            if kind in FULL_TYPES:
                layers.append(CompressedLayer(self.policy, i, full.index(i), len(full)))
            else:
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
        super().__init__(layers=layers)
        self.active = False
        #: evictions queued for one batched selection (see ``crushkv.layer_stack``)
        self.pending: list[tuple[CompressedLayer, int]] = []
        #: uncompressed K/V bytes of the queued layers of a long pass (the prompt)
        self.pending_bytes = 0
        #: cap on ``pending_bytes``; 0 cuts a long pass back layer by layer (lowest peak memory)
        self.defer_bytes = DEFER_MAX_BYTES
        #: False: select layer by layer (same kept sets, more per-op overhead); kept for A/B runs and tests
        self.batched_eviction = True

    def reset(self) -> None:
        self.pending, self.pending_bytes = [], 0
        super().reset()

    def evict_pending(self) -> None:
        """Run the queued evictions, same-shape layers in one batched selection."""
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        evict(pending, batched=self.batched_eviction)

    def queue_eviction(self, layer: CompressedLayer, budget: int, short_pass: bool) -> None:
        """Queue ``layer``'s cut to ``budget``; the pass's last compressed layer runs the queue (``evict_pending``).

        A short (decode) pass always queues. A long pass (the prompt) queues while the queued layers' uncompressed
        K/V stay within ``defer_bytes``, running the queue first when this layer would push it past that.
        """
        if short_pass:
            self.pending.append((layer, budget))
            return
        size = layer.keys.nbytes + layer.values.nbytes
        if self.pending and self.pending_bytes + size > self.defer_bytes:
            self.evict_pending()
        if size > self.defer_bytes:
            evict([(layer, budget)])
            return
        self.pending.append((layer, budget))
        self.pending_bytes += size

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not self.active:
            raise RuntimeError(
                "a CrushCache is only valid inside `with crushkv.compress(model, spec) as cache:` "
                "(the compressed layers need crushkv's attention function)"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # ------------------------------------------------------------------ inspection
    @property
    def compressed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CompressedLayer)]

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Logical positions held by a layer, ``[batch, kv_heads, kept]`` (same row per head if layer-shared).

        For a sliding-window layer these are the positions of its window.
        """
        layer = self.layers[layer_idx]
        if isinstance(layer, CompressedLayer):
            if layer.positions is None:
                return torch.zeros(0, 0, 0, dtype=torch.long)
            return layer.positions.clone()
        if not layer.is_initialized:
            return torch.zeros(0, 0, 0, dtype=torch.long)
        b, h, n = layer.keys.shape[:3]
        start = layer.cumulative_length - n
        return torch.arange(start, start + n, device=layer.keys.device).expand(b, h, n).clone()

    def kept_tokens(self) -> list[int]:
        """Physical slots held per layer (per KV head)."""
        return [0 if not layer.is_initialized else layer.keys.shape[-2] for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of key/value storage actually held (distinct tensor storages, not logical views)."""
        seen: dict[int, int] = {}
        for layer in self.layers:
            if layer.is_initialized:
                for t in (layer.keys, layer.values):
                    storage = t.untyped_storage()
                    seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache (``DynamicCache``) would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            b, h, _, d = layer.keys.shape
            if isinstance(layer, CompressedLayer):
                n = layer.seen
            else:
                n = min(layer.cumulative_length, layer.sliding_window - 1)
            total += 2 * b * h * n * d * layer.keys.element_size()
        return total

    def summary(self) -> dict[str, object]:
        """Logical length, kept slots per layer and bytes held vs. an uncompressed cache."""
        return {
            "policy": self.policy.spec,
            "seen_tokens": self.get_seq_length(),
            "kept_tokens": self.kept_tokens(),
            "nbytes": self.nbytes(),
            "full_nbytes": self.full_nbytes(),
        }
