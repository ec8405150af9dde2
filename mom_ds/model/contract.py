"""TrainableLM: what the training session, loop and evaluation call on a model. Both
MoMForCausalLM (pre-training) and ModularStudent (modular distillation) implement it, with
the same signatures (tests/model/test_model_routing_record.py compares them)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from .config import MoMConfig
    from .model import MoMOutput
    from .routing import RoutingRecord


@runtime_checkable
class TrainableLM(Protocol):
    config: "MoMConfig"  # the layout parallelize(), FLOPs and the checks read

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                loss_chunk_tokens: int = 0) -> "MoMOutput":
        """With labels: out.loss (to train on), out.lm_loss, out.terms (logged as
        train/<name>) and out.routing (a RoutingRecord; the empty record without routing).
        Implementations may take more keyword arguments, each with a default."""

    def num_params(self, exclude_positions: bool = True) -> int:
        """Parameters trained, before sharding; exclude_positions leaves out a position
        table of the model's own (nanoGPT's convention)."""

    def begin_step(self, step: int) -> None:
        """Called before each optimizer step's micro-batches."""

    def set_activation_checkpointing(self, mode: str) -> None:
        """train.activation_checkpointing: none, layer or block."""

    def train_flops_per_token(self, seq_len: int, out: "MoMOutput",
                              routing: Optional["RoutingRecord"] = None) -> float:
        """Training FLOPs per token: of `routing` (a sum over micro-batches and ranks) when
        given, else of the forward `out`."""
