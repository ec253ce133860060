"""``kvzip``: KVzip (Kim et al., arXiv 2505.23416; kvpress ``KVzipPress``): query-agnostic scores from how much a
reconstruction of the context attends to each cached token.

After the prompt, the model is fed "repeat the previous context" followed by the context again, ``chunk`` tokens at
a time (``crushkv.reconstruct`` runs those passes and takes their tokens out of the cache again). A token's score
is the largest attention any query of its chunk's reconstruction pays it, over the query heads of its KV head, with
the softmax taken over the sink tokens, the chunk and the reconstruction so far (KVzip's subsampled keys). Scores
need no question, so the cut suits question-agnostic use; it costs about two extra prompt forwards.

``scope=model`` (KVzip's default) ranks every layer and head of the model together, so layers keep different
counts (the average is the budget); ``scope=layer`` gives each layer the budget and ranks its heads together. Heads
keep different counts either way (``store=paged`` frees exactly that; ``store=dense`` pads to the largest head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crushkv.policies.adakv import headwise_mask
from crushkv.policies.base import Host, register
from crushkv.view import LayerView

SCORE = "kvzip"
SCOPES = ("model", "layer")
PROMPTS = ("auto", "none")
#: the reconstruction instructions (KVzip's): the first chunk, and later chunks (followed by the previous chunk's
#: last ``OVERLAP`` tokens, so the model knows where to resume)
FIRST_PROMPT = "\n\nRepeat the previous context exactly."
NEXT_PROMPT = "\n\nRepeat the part of the previous context exactly, starting with"
OVERLAP = 8
#: query rows scored together (bounds the logits buffer to ``group x ROWS x slots`` per KV head)
ROWS = 256


@register
@dataclass
class KVzip(Host):
    """Context reconstruction scores. ``chunk``: context tokens per reconstruction pass; ``scope``: ``model`` or
    ``layer`` (where budgets are spent); ``prompt``: ``auto`` (KVzip's instruction, needs the tokenizer) or ``none``
    (the chunk is repeated without it)."""

    name = "kvzip"
    phases = ("prefill",)  # the context is scored once, by its reconstruction
    reconstructs = True
    ragged = True
    sink: int = 4
    recent: int = 0
    chunk: int = 2048
    scope: str = "model"
    prompt: str = "auto"

    def validate(self) -> None:
        super().validate()
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"kvzip: chunk must be an int >= 1 (tokens per reconstruction pass), got {self.chunk!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"kvzip: scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.prompt not in PROMPTS:
            raise ValueError(f"kvzip: prompt must be one of {', '.join(PROMPTS)}, got {self.prompt!r}")

    @property
    def batchable(self) -> bool:  # type: ignore[override]
        # scope=model gives every layer its own budget, so no two layers are cut as one stack
        return self.scope == "layer"

    def with_default_phase(self, phase: str) -> Host:
        # a wrapper's default phase (KVCrush's decode) cannot apply: the scores exist once, after the prompt
        return self

    def notes(self) -> list[str]:
        return [
            *super().notes(),
            f"kvzip: the prompt is scored by reconstructing it ({self.chunk} tokens per extra forward pass, about two "
            "prompt forwards in all); heads keep different counts (store=dense pads to the largest head)",
        ]

    def head_scores(self, view: LayerView) -> torch.Tensor:
        return view.state[SCORE][:, :, None]

    def keep_mask(self, view: LayerView, budget: int) -> torch.Tensor:
        # KVzip ranks the heads of a layer together; only the always-kept tokens are held per head
        return headwise_mask(self.priorities(view), view, budget, min(budget, self.min_budget()))


def chunk_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    row_valid: torch.Tensor,
    chunk: torch.Tensor,
    sink_end: torch.Tensor,
    first_new: int,
    scaling: float,
) -> torch.Tensor:
    """``[B, H, n]`` KVzip scores of one reconstruction pass (0 outside each row's chunk).

    ``query`` ``[B, Hq, q, d]``: the pass's queries (at positions ``first_new + i``); ``keys`` ``[B, H, n, d]`` and
    ``positions``/``valid`` ``[B, 1 or H, n]``: every slot, the pass's own tokens included; ``row_valid`` ``[B, q]``:
    real queries; ``chunk`` ``[B, 2]``: each row's scored positions ``[lo, hi)``; ``sink_end`` ``[B]``: positions
    below it are sinks. Query ``i`` sees the sinks, the chunk and the pass's tokens up to itself.
    """
    b, hq, q, _ = query.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    positions = positions.expand(b, h, n)
    valid = valid.expand(b, h, n)
    lo, hi = chunk[:, 0, None, None], chunk[:, 1, None, None]
    in_chunk = valid & (positions >= lo) & (positions < hi)
    context = in_chunk | (valid & (positions < sink_end[:, None, None]))  # [B, H, n]
    new = valid & (positions >= first_new)
    out = torch.zeros(b, h, n, dtype=torch.float32, device=query.device)
    for start in range(0, q, ROWS):
        rows = slice(start, min(start + ROWS, q))
        here = torch.arange(first_new + start, first_new + rows.stop, device=query.device)
        sees = context[:, :, None] | (new[:, :, None] & (positions[:, :, None] <= here[None, None, :, None]))
        sees = sees & row_valid[:, None, rows, None]  # [B, H, r, n]
        qb = query[:, :, rows].float().view(b, h, g, -1, query.shape[-1])
        logits = torch.einsum("bhgrd,bhnd->bhgrn", qb, keys.float()) * scaling
        logits = logits.masked_fill(~sees[:, :, None], float("-inf"))
        probs = logits.softmax(-1).nan_to_num(0.0)  # a padding query sees nothing: no weight
        out = torch.maximum(out, probs.amax(dim=(2, 3)))
    return torch.where(in_chunk, out, 0.0)
