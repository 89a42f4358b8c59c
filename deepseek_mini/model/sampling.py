"""Turning logits into the next token: greedy, temperature, top-k and nucleus (top-p) sampling.

`sampling_probs` is the distribution a token is drawn from; plain decoding samples it, and speculative
decoding (speculative.py) compares the main model's and the draft's with it.
"""

from __future__ import annotations

import torch


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution a token is drawn from: softmax(logits / temperature) restricted to the top-k tokens and
    to the smallest set reaching top_p, renormalised. logits [..., V] -> fp32 probabilities [..., V];
    temperature > 0 (temperature 0 is greedy: no distribution)."""
    shape = logits.shape
    # shifted so the largest logit is 0, then divided in fp64: any temperature > 0 gives a distribution (one of
    # 1e-300 made every fp32 logit inf or nan, and multinomial refused the result); the softmax is unchanged
    logits = logits.double().reshape(-1, shape[-1])
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, idx, sorted_logits)
    return logits.softmax(dim=-1).float().reshape(shape)


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token from [B, V] logits: greedy at temperature 0, else top-k / nucleus sampling."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
