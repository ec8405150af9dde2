"""The LM head and its cross-entropy: whole logits, or computed a chunk of rows at a time so the
(tokens x vocab) logits never exist whole: at GPT-2's vocabulary and 16 x 1024 tokens per
rank they are 3.3 GB in fp32, more than the model.

The loss is a scalar, so its gradient is known up to one factor before the backward runs:
each chunk's logits become d(loss)/d(logits) in place right after its loss terms are read,
and are turned into that chunk's gradients for the hidden states and the head; the
backward only scales them by the incoming gradient. That is three matmuls per chunk, as
with whole logits (Liger-Kernel's fused linear cross-entropy works this way). Recomputing
each chunk's logits in the backward instead (torchtune's LinearCrossEntropyLoss,
cut-cross-entropy) costs a fourth matmul: measured 0.96x Hugging Face's tokens/s against
1.11x for whole logits at vocabulary 50257 (bench/model_speed.py, CPU). Without a gradient
(evaluation) only the loss is computed. Numerics match the whole-logits path: logits in the
hidden states' dtype, upcast to fp32 for the softmax, the gradient cast back before its
matmuls."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over rows whose label is not IGNORE_INDEX of cross_entropy(hidden @ weight.T)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_rows: int) -> torch.Tensor:
        valid = labels != IGNORE_INDEX
        count = valid.sum()  # a device tensor: no host sync
        safe_labels = labels.clamp_min(0)  # ignored rows read column 0 and are masked out
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        if grads:
            row_scale = valid / count  # d(mean)/d(row loss)
            grad_hidden = torch.empty_like(hidden)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            logits = (hidden[part] @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            target = safe_labels[part, None]
            losses[part] = (lse - logits.gather(1, target)).squeeze(1)
            if grads:  # (softmax - onehot(label)) * scale, built in the logits' buffer:
                # exp(logit - lse + log scale) is one pass (log 0 = -inf zeroes ignored rows)
                scale = row_scale[part, None]
                grad_logits = logits.sub_(lse - scale.log()).exp_()
                grad_logits.scatter_add_(1, target, -scale)
                grad_logits = grad_logits.to(hidden.dtype)
                torch.mm(grad_logits, weight, out=grad_hidden[part])
                if grad_logits.dtype == torch.float32:  # accumulate in place, no temporary
                    grad_weight.addmm_(grad_logits.T, hidden[part])
                else:
                    grad_weight += (grad_logits.T @ hidden[part]).float()
        if grads:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return torch.where(valid, losses, 0.0).sum() / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss.to(grad_hidden.dtype), \
            grad_weight * grad_loss.to(grad_weight.dtype), None, None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    chunk_rows: int) -> torch.Tensor:
    """hidden (..., d) after the final norm, weight (V, d), labels (...) -> the mean
    cross-entropy, as F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)."""
    return ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                           labels.reshape(-1), chunk_rows)


def head_and_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: Optional[torch.Tensor],
                  loss_chunk_tokens: int = 0
                  ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(logits, loss) of hidden (B, T, d) after the final norm through the head weight
    (V, d): with labels and loss_chunk_tokens > 0 the loss alone, chunked (logits None);
    otherwise the whole logits and, with labels, their mean cross-entropy."""
    if labels is not None and loss_chunk_tokens > 0:
        return None, chunked_lm_loss(hidden, weight, labels, loss_chunk_tokens)
    logits = F.linear(hidden, weight)
    if labels is None:
        return logits, None
    return logits, F.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                   labels.reshape(-1), ignore_index=IGNORE_INDEX)


class UntiedHead(nn.Module):
    """A head with its own matrix (V, d), used inside its own forward: ZeRO-3 gathers a
    parameter when its module is called, not when another module reads it."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))

    def forward(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_chunk_tokens: int = 0
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        return head_and_loss(hidden, self.weight, labels, loss_chunk_tokens)
