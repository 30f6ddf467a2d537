"""Choosing the next token: pure logits processors and a small frozen `SamplingConfig`.

Every function here maps Tensors to Tensors with no hidden state, so the same code runs in
PyNative and inside `ms.jit` (the decode step). The order and semantics follow Hugging Face
`generate`, which the official TeleChat2 release uses:

    repetition penalty -> (greedy: argmax) | (sample: temperature -> top-k -> top-p -> draw)

MindSpore has no explicit RNG keys, so randomness comes in as an argument: one host-drawn
uniform number per row and step (numpy, seeded), turned into a token by inverse-CDF sampling
over the processed distribution. The same seed therefore gives the same tokens in PyNative
and graph mode, across processes, with no global RNG state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import mindspore as ms
from mindspore import ops

from tc2.nn.attention import NEG     # a finite "minus infinity": removed tokens get probability exactly 0


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick the next token. Defaults are the release's `generation_config.json`.

    do_sample=False is greedy decoding: argmax of the repetition-penalized logits (Hugging
    Face applies the penalty even when greedy; temperature, top_k and top_p cannot change an
    argmax). do_sample=True draws from softmax(logits / temperature) restricted to the top_k
    most likely tokens and then to the smallest set whose mass reaches top_p.
    top_k=0 and top_p=1.0 switch those filters off; repetition_penalty=1.0 switches the
    penalty off; temperature=0 with do_sample=True means greedy.
    The config is static for compilation: each distinct config compiles its own decode step.
    """
    do_sample: bool = False
    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.85
    repetition_penalty: float = 1.03

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):
            raise TypeError(f"SamplingConfig.do_sample must be a bool, got {self.do_sample!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingConfig.temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingConfig.top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError("SamplingConfig.repetition_penalty must be > 0 (1 = off), "
                             f"got {self.repetition_penalty}")

    @classmethod
    def greedy(cls) -> "SamplingConfig":
        """Plain argmax: no repetition penalty (what `sampling=None` means in `generate`)."""
        return cls(do_sample=False, repetition_penalty=1.0)

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0.0

    @property
    def uses_penalty(self) -> bool:
        return self.repetition_penalty != 1.0


# ---- processors: logits [B, V] float32 -> logits [B, V] float32 ------------------------------

def apply_repetition_penalty(logits, presence, penalty: float):
    """HF's rule for every token already in the row (prompt or generated): a positive logit is
    divided by `penalty`, a negative one multiplied, so penalty > 1 always makes it less likely.
    presence [B, V] bool marks those tokens."""
    if penalty == 1.0:
        return logits
    penalized = ops.where(logits < 0, logits * penalty, logits / penalty)
    return ops.where(presence, penalized, logits)


def apply_temperature(logits, temperature: float):
    """logits / temperature (temperature > 0); 1.0 is the identity."""
    if temperature == 1.0:
        return logits
    return logits / temperature


def apply_top_k(logits, k: int):
    """Keep the k largest logits of each row (ties with the k-th are kept, as in HF)."""
    V = logits.shape[-1]
    if k <= 0 or k >= V:
        return logits
    kth = ops.topk(logits, k)[0][:, k - 1:k]                                  # [B, 1]
    return ops.where(logits < kth, NEG, logits)


def apply_top_p(logits, p: float, candidates: int = 0):
    """Keep the smallest set of most likely tokens whose probability mass reaches p (nucleus).

    A token survives when the mass of the tokens ranked strictly above it is < p, which is
    HF's `cumsum(ascending probs) > 1 - p`. The most likely token always survives. The cut is
    applied as a logit threshold, so tokens tied with the last survivor survive too.
    candidates=k > 0 ranks only the k largest logits (a top-k instead of a full sort of the
    vocabulary): exact when at most k tokens have nonzero probability, e.g. after top-k.
    """
    if p >= 1.0:
        return logits
    V = logits.shape[-1]
    if 0 < candidates < V:
        ranked = ops.topk(logits, candidates)[0]                              # [B, k] descending
    else:
        ranked = ops.sort(logits, axis=-1, descending=True)[0]                # [B, V]
    top = ranked[:, 0:1]                                                      # [B, 1]
    total = ops.exp(logits - top).sum(axis=-1, keepdims=True)                 # [B, 1] whole row
    probs = ops.exp(ranked - top) / total                                     # [B, k|V]
    mass_above = ops.cumsum(probs, axis=-1) - probs
    keep = mass_above < p
    threshold = ops.where(keep, ranked, float("inf")).min(axis=-1, keepdims=True)   # [B, 1]
    return ops.where(logits < threshold, NEG, logits)


def process_logits(logits, presence, sampling: SamplingConfig):
    """The HF chain for sampling: repetition penalty, temperature, top-k, top-p. [B, V] float32."""
    logits = apply_repetition_penalty(logits, presence, sampling.repetition_penalty)
    logits = apply_temperature(logits, sampling.temperature)
    logits = apply_top_k(logits, sampling.top_k)
    return apply_top_p(logits, sampling.top_p, candidates=sampling.top_k)


# ---- drawing a token --------------------------------------------------------------------------

def greedy(logits):
    """argmax per row -> [B] int32."""
    return ops.argmax(logits, dim=-1).astype(ms.int32)


def sample_inverse_cdf(logits, uniform):
    """Draw one token per row from softmax(logits) with uniform [B] in [0, 1): the token whose
    CDF interval [cdf_{i-1}, cdf_i) holds u * total. Tokens with probability 0 (filtered out)
    have an empty interval and are never drawn, even when rounding pushes u * total to the top.
    """
    V = logits.shape[-1]
    probs = ops.softmax(logits.astype(ms.float32), axis=-1)                  # [B, V]
    cdf = ops.cumsum(probs, axis=-1)                                          # [B, V]
    target = uniform.astype(ms.float32).reshape(-1, 1) * cdf[:, V - 1:V]      # [B, 1]
    below = (cdf <= target).astype(ms.int32).sum(axis=-1)                     # [B]
    index = ops.arange(V, dtype=ms.int32).expand_dims(0)                      # [1, V]
    last_possible = ops.where(probs > 0, index, 0).max(axis=-1)               # [B]
    return ops.minimum(below, last_possible).astype(ms.int32)


def next_token(logits, presence, uniform, sampling: Optional[SamplingConfig]):
    """The token each row emits next. logits [B, V] (any float dtype), presence [B, V] bool
    (tokens already in the row; ignored when no penalty), uniform [B] -> [B] int32.
    sampling=None: plain argmax."""
    logits = logits.astype(ms.float32)
    if sampling is None:
        return greedy(logits)
    if sampling.is_greedy:
        return greedy(apply_repetition_penalty(logits, presence, sampling.repetition_penalty))
    return sample_inverse_cdf(process_logits(logits, presence, sampling), uniform)


def mark_present(presence, tokens):
    """presence [B, V] bool with tokens [B] added (the repetition-penalty memory)."""
    V = presence.shape[-1]
    hit = ops.arange(V, dtype=ms.int32).expand_dims(0) == tokens.astype(ms.int32).reshape(-1, 1)
    return ops.logical_or(presence, hit)
