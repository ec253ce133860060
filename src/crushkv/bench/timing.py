"""Timed greedy generation with a compressed cache: prefill/TTFT, decode speed, kept tokens and bytes, one run."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from crushkv.api import cache_kwargs, compress
from crushkv.policies import Policy, parse_policy
from crushkv.profiling import PROFILER


@dataclass
class GenerationRun:
    """Measurements of one prompt through one policy (times in seconds, bytes of K/V)."""

    policy: str
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    kept_tokens: list[int]
    nbytes: int
    full_nbytes: int
    max_nbytes: int
    output_ids: list[int] = field(repr=False)
    sections: dict[str, float] = field(default_factory=dict)
    #: real K/V storage bytes after the prefill and after every decode step (``new_tokens`` entries)
    nbytes_trace: list[int] = field(default_factory=list, repr=False)
    #: bytes of the tokens held at the same points (what the budget governs; storage adds the store's slack)
    logical_trace: list[int] = field(default_factory=list, repr=False)
    #: bytes of the K/V tensors' elements at the end (kept slots x heads x dim), to compare with ``nbytes``
    logical_nbytes: int = 0
    #: profiler seconds spent during the prefill alone (a snapshot of ``sections`` after the first forward)
    prefill_sections: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else float("nan")

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out.update(decode_tokens_per_s=self.decode_tokens_per_s, total_s=self.total_s)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_generation(
    model,
    input_ids: torch.Tensor,
    policy: str | Policy,
    new_tokens: int,
    profile: bool = False,
    defer_bytes: int | None = None,
) -> GenerationRun:
    """Greedy-decode ``new_tokens`` after ``input_ids`` (batch 1) inside ``crushkv.compress`` (``defer_bytes``: its).

    The prefill time is the time to first token (one forward over the prompt, logits of the last position only).
    Decode steps are timed together; bytes are sampled after every step to report the maximum held.
    """
    policy = parse_policy(policy)
    device = input_ids.device
    with PROFILER.recording() if profile else nullcontext() as prof, compress(model, policy, defer_bytes) as cache:
        cached = cache_kwargs(model, cache)
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids, **cached, logits_to_keep=1)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        prefill = time.perf_counter() - start
        prefill_sections = dict(prof.seconds) if prof is not None else {}
        generated = [int(token)]
        trace, logical = [cache.nbytes()], [cache.logical_nbytes()]
        decode = 0.0
        for _ in range(new_tokens - 1):
            start = time.perf_counter()
            out = model(token, **cached)
            token = out.logits[:, -1:].argmax(-1)
            generated.append(int(token))  # a host sync: the step is over
            decode += time.perf_counter() - start
            trace.append(cache.nbytes())  # sampled outside the timed step
            logical.append(cache.logical_nbytes())
        sections = dict(prof.seconds) if prof is not None else {}
        return GenerationRun(
            policy=policy.spec,
            prompt_tokens=input_ids.shape[1],
            new_tokens=new_tokens,
            prefill_s=prefill,
            decode_s=decode,
            kept_tokens=[cache.kept_tokens()[i] for i in cache.compressed_layers],
            nbytes=cache.nbytes(),
            full_nbytes=cache.full_nbytes(),
            max_nbytes=max(trace),
            output_ids=generated,
            sections=sections,
            nbytes_trace=trace,
            logical_trace=logical,
            logical_nbytes=cache.logical_nbytes(),
            prefill_sections=prefill_sections,
        )
