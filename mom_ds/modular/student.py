"""ModularStudent: a frozen teacher and its modularized layers, trained by multi-grained
module replacing and distillation (docs/modular.md).

Every optimizer step draws one assembly (assembly.sample) and runs the student through it:
teacher layers (frozen) and modules (trained) in turn, with the teacher's own embeddings,
final LayerNorm and head (frozen). The teacher runs once per batch without gradients and
gives the targets of the distillation losses. The draw is seeded by (train.seed, optimizer
step) only, so every rank and every micro-batch of a step runs the same graph: ZeRO-3
gathers the same parameters on every rank, a step means the same on any number of ranks
and accumulation steps, and a resumed run draws what the uninterrupted one drew.
"""
from __future__ import annotations

import copy
import functools
import random
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model import MoMForCausalLM, MoMOutput
from ..model.checkpointing import MODES, checkpointed
from ..model.flops import head_params, layer_params
from ..model.routing import RoutingRecord
from .assembly import Assembly, check, sample, uniform
from ..config import ModularConfig
from .losses import hidden_distillation, logit_distillation


@dataclass
class ModularOutput(MoMOutput):
    assembly: Assembly = ()  # the assembly this forward ran


def module_key(granularity: int) -> str:
    return f"g{granularity}"


class ModularStudent(nn.Module):
    def __init__(self, teacher: MoMForCausalLM, settings: ModularConfig, seed: int):
        super().__init__()
        self.teacher = teacher.requires_grad_(False)
        self.config = teacher.config  # the layout parallelize() and the checks read
        self.settings = settings
        self.granularities = settings.resolve(teacher.config)
        self.n_layers = teacher.config.n_bottom
        # module j of granularity g starts as a copy of the first layer of its group,
        # teacher layer j * g (BERT-of-Theseus)
        self.modular = nn.ModuleDict({
            module_key(g): nn.ModuleList(copy.deepcopy(teacher.bottom[j * g])
                                         for j in range(self.n_layers // g))
            for g in self.granularities})
        self.modular.requires_grad_(True)
        self.eval_assembly = uniform(self.n_layers,
                                     settings.eval_granularity or self.granularities[0])
        self.seed = seed
        self.checkpointing = False
        self.begin_step(0)

    def train(self, mode: bool = True) -> "ModularStudent":
        super().train(mode)
        self.teacher.eval()  # frozen: never dropout, whatever the engine asks
        return self

    def set_activation_checkpointing(self, mode: str) -> None:
        """train.activation_checkpointing: under layer or block, each tile of the assembly
        (a teacher layer or a module) is recomputed in the backward."""
        if mode not in MODES:
            raise ValueError(f"activation checkpointing {mode!r} is not one of {MODES}")
        self.checkpointing = mode != "none"

    def num_params(self, exclude_positions: bool = True) -> int:
        """Trained parameters: the modules (the teacher, with the position table, is
        frozen, so exclude_positions changes nothing). (contract.py: TrainableLM)"""
        return sum(p.numel() for p in self.modular.parameters())

    # --- the schedule ----------------------------------------------------------------------
    def replace_prob(self, step: int) -> float:
        s = self.settings
        return min(1.0, s.replace_prob + s.replace_prob_slope * step)

    def begin_step(self, step: int) -> None:
        """Called by the training loop before each optimizer step's micro-batches."""
        self.step_assembly = self.draw(step)

    def draw(self, step: int) -> Assembly:
        rng = random.Random(f"modular/{self.seed}/{step}")
        return sample(self.n_layers, self.granularities, self.replace_prob(step), rng)

    # --- forward ---------------------------------------------------------------------------
    def layer(self, tile) -> nn.Module:
        return self.modular[module_key(tile.size)][tile.group] if tile.is_module \
            else self.teacher.bottom[tile.start]

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                assembly: Optional[Assembly] = None, loss_chunk_tokens: int = 0) -> ModularOutput:
        """The student through `assembly` (default: this step's draw in training, the
        eval_granularity assembly in evaluation). With labels: the weighted sum of the LM,
        logit-distillation and hidden-distillation losses, each also in out.terms.
        loss_chunk_tokens is accepted for the training loop and not used: distillation
        compares the whole logits."""
        if assembly is None:
            assembly = self.step_assembly if self.training else self.eval_assembly
        else:
            check(assembly, self.n_layers, self.granularities)
        s, teacher = self.settings, self.teacher
        T = input_ids.shape[1]
        distil = labels is not None and self.training and (s.kd_weight or s.hidden_weight)

        with torch.no_grad():
            x, rope = teacher.embed(input_ids, torch.arange(T, device=input_ids.device))
            states = [x]
            if distil:
                for block in teacher.bottom:
                    states.append(block(states[-1], rope=rope))
                teacher_logits = teacher.logits(states[-1])
        modules = [t for t in assembly if t.is_module]
        # Below the first module the student computes exactly the teacher's states, without
        # a trained parameter upstream: start from the teacher's state there when known.
        start = modules[0].start if modules and distil else 0
        x = states[start]
        pairs = []
        for tile in assembly:
            if tile.start < start:
                continue
            layer = functools.partial(self.layer(tile), rope=rope)
            x = checkpointed(layer, x) if self.checkpointing and self.training \
                and torch.is_grad_enabled() else layer(x)
            if tile.is_module and distil:
                pairs.append((x, states[tile.end]))
        logits = teacher.logits(x)
        out = ModularOutput(logits=logits, assembly=assembly,
                            routing=RoutingRecord())  # it routes nothing: the empty record
        if labels is None:
            return out
        lm = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=-100)
        zero = lm.new_zeros(())
        kd = logit_distillation(logits, teacher_logits, s.kd_temperature, labels) \
            if distil else zero
        hidden = hidden_distillation(pairs) if pairs else zero
        out.lm_loss = lm
        out.loss = s.lm_weight * lm + s.kd_weight * kd + s.hidden_weight * hidden
        if self.training:
            out.loss = out.loss + self._zero_for_unused(assembly, x)
        out.terms = {"lm_loss": lm, "kd_loss": kd, "hidden_loss": hidden}
        return out

    def _zero_for_unused(self, assembly: Assembly, x: torch.Tensor) -> torch.Tensor:
        """0 times one token through every module the assembly leaves out, so that every
        module gets a gradient, exactly zero, at every step. Without it DeepSpeed's ZeRO-3
        steps a module left out with the gradient it had the step before (measured: the
        gradient norm of a step was the root sum of squares of its own and the previous
        step's), and an assembly with no module at all would leave the backward no graph."""
        used = {(t.size, t.group) for t in assembly if t.is_module}
        token = x[:1, :1].detach()
        zero = x.new_zeros(())
        for g in self.granularities:
            for j, module in enumerate(self.modular[module_key(g)]):
                if (g, j) not in used:
                    zero = zero + 0.0 * module(token).sum()
        return zero

    # --- what the loop reports -------------------------------------------------------------
    def train_flops_per_token(self, seq_len: int, out: ModularOutput,
                              routing: Optional[RoutingRecord] = None) -> float:
        """The teacher's forward (2 FLOPs per parameter, 4 d T per attention) plus the
        student's forward and backward over its assembly (6 per parameter, 12 d T per
        attention; nanoGPT's convention, an upper bound: frozen layers compute no weight
        gradient), with the head counted in both. `routing` is ignored: the student
        routes nothing (its record is the empty one)."""
        d = self.config.d_model
        layer, head = layer_params(self.config), head_params(self.config)
        attention = d * seq_len
        teacher = 2 * (self.n_layers * layer + head) + 4 * attention * self.n_layers
        student = len(out.assembly) * (6 * layer + 12 * attention) + 6 * head
        return float(teacher + student)
