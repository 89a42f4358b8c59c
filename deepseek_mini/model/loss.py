"""The training loss: the LM head and its cross-entropy in one autograd function.

    loss = mean over labelled tokens of  logsumexp(x W^T) - (x W^T)[label]

`F.cross_entropy(lm_head(x))` passes over the [T, V] logits three times after the GEMM writes them: the
forward reads them for the log-sum-exp, and the backward reads them again to write their gradient
softmax - onehot. At the `small` shape (16K tokens x 16K vocabulary) each pass is 0.5 GB. Here the gradient
is written in the same pass that computes the log-sum-exp (the row is still in cache), and the backward
only scales the two GEMMs that use it. The upstream gradient of the loss (1 in training) multiplies the
[T, D] and [V, D] GEMM outputs, not the [T, V] gradient, so that is never read a third time.

The logits are never returned from here; `DeepSeekV2.forward` uses this only when it is asked for the loss
and not the logits (the training step). It calls it through the parameterless module `LinearCrossEntropy`
(`DeepSeekV2.head_loss`), so that regional compilation (training/compile.py) can compile it as one of its
regions: run eagerly, its elementwise steps each pass over the [T, V] logits in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100  # a label that is no target (padding, an unknown MTP input): skipped by every loss here


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_VD, labels_T, ignore_index: int):
        device = x_TD.device.type
        if torch.is_autocast_enabled(device):  # the GEMMs in the autocast dtype, as nn.Linear would run
            dtype = torch.get_autocast_dtype(device)
        else:
            dtype = torch.promote_types(x_TD.dtype, w_VD.dtype)
        x_c, w_c = x_TD.to(dtype), w_VD.to(dtype)
        with torch.autocast(device, enabled=False):
            logits_TV = (x_c @ w_c.t()).to(torch.promote_types(dtype, torch.float32))  # softmax in >= fp32
            lse_T = logits_TV.logsumexp(dim=-1)
            valid_T = labels_T != ignore_index
            n = valid_T.sum().clamp(min=1)  # labelled tokens (all-ignored batches give 0, not nan)
            label_T = labels_T.masked_fill(~valid_T, 0)
            target_T = logits_TV.gather(1, label_T[:, None])[:, 0]
            loss = ((lse_T - target_T) * valid_T).sum() / n
            # d loss / d logits = (softmax - onehot(label)) / n on labelled rows, 0 elsewhere
            probs_TV = (logits_TV - lse_T[:, None]).exp()
            is_label_TV = torch.arange(logits_TV.shape[1], device=x_TD.device) == label_T[:, None]
            grad_TV = ((probs_TV - is_label_TV.to(probs_TV.dtype)) * (valid_T / n)[:, None]).to(dtype)
        ctx.save_for_backward(x_c, w_c, grad_TV)
        ctx.dtypes = (x_TD.dtype, w_VD.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x_c, w_c, grad_TV = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        with torch.autocast(x_c.device.type, enabled=False):  # the saved operands are already in the GEMM dtype
            grad_x = (grad_TV @ w_c) * grad_loss.to(x_c.dtype)
            grad_w = (grad_TV.t() @ x_c) * grad_loss.to(x_c.dtype)
        return grad_x.to(x_dtype), grad_w.to(w_dtype), None, None


def linear_cross_entropy(x_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of the logits x W^T against labels (ignore_index skipped), without returning them."""
    return _LinearCrossEntropy.apply(x_TD, w_VD, labels_T, ignore_index)


class LinearCrossEntropy(nn.Module):
    """linear_cross_entropy as a module. It has no parameters (the head's weight is an argument) and adds nothing
    to the state dict; it exists so that the head's loss is a module regional compilation can compile."""

    def forward(self, x_TD: torch.Tensor, w_VD: torch.Tensor, labels_T: torch.Tensor,
                ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        return linear_cross_entropy(x_TD, w_VD, labels_T, ignore_index)
