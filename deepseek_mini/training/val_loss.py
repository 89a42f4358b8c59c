"""The validation loss every report shows: the mean cross-entropy over target tokens.

Training validation (LitDeepSeek), eval.py, results.json and the sweep report all read this one number. Each
batch's loss is already the mean over its labelled tokens (labels != -100), so the batch contributes
loss x its token count; summing those and dividing by the total count weighs every token once, however the
windows fall into batches (a short last batch counts for its few tokens, not as much as a full one; a batch of
DDP's padding windows, labels all ignored, for none). The sums are kept in float64 so the order of batches does
not move the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deepseek_mini.model.loss import IGNORE_INDEX


class TokenMeanLoss:
    """Accumulates (batch mean loss, labels) pairs; `compute()` gives the mean per target token and the count."""

    def __init__(self) -> None:
        self.loss_sum: torch.Tensor | None = None  # float64, on the batches' device (no host sync per batch)
        self.tokens: torch.Tensor | None = None

    def update(self, mean_loss: torch.Tensor, labels: torch.Tensor) -> None:
        n = (labels != IGNORE_INDEX).sum()
        # a batch of padding windows only (DDP validation's last round) has no targets: its mean is nan, not 0
        s = torch.where(n > 0, mean_loss.detach().to(torch.float64) * n, 0.0)
        self.loss_sum = s if self.loss_sum is None else self.loss_sum + s
        self.tokens = n if self.tokens is None else self.tokens + n

    def compute(self, all_reduce: Callable[[torch.Tensor], None] | None = None) -> tuple[float, int]:
        """(mean loss per target token, number of target tokens); `all_reduce` sums over ranks in place."""
        if self.loss_sum is None:
            raise ValueError("no validation batches")
        totals = torch.stack([self.loss_sum, self.tokens.to(torch.float64)])
        if all_reduce is not None:
            all_reduce(totals)
        loss_sum, tokens = totals.tolist()
        if tokens == 0:
            raise ValueError("the validation batches hold no target tokens")
        return loss_sum / tokens, int(tokens)
