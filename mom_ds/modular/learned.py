"""Learned assembly (beyond the paper): per token, a router chooses the path through each
segment of the teacher's stack, among the teacher's layers and the trained modules, under a
price per executed layer (docs/modular.md, section 6).

The stack is cut into segments of S layers (S one of the granularities). The paths of a
segment are its tilings by teacher layers and the modules whose granularity divides S: for
S = 2, {t t, g2}; for S = 6 with granularities {2, 3}, all 13 assemblies of 6 layers. At the
start of each segment a router (LayerNorm + linear, on the residual stream) scores the paths
and the token takes the best one. A token on a path attends only to the tokens on the same
path (and itself), as a sparse execution of the paths would: each path runs with that
keep-mask, so the loss and the layers counted per token are those of the routed model.

The teacher and the modules stay frozen; only the routers train, by cross-entropy towards
the path that minimises (error + price * cost): the mean squared error of the path's output
against the teacher's state at the segment's end (relative to that state's mean square),
plus price times the path's layers over S. price 0 picks the most accurate path, a large
price the cheapest: one router per price is one point of the loss-vs-FLOPs curve.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.flops import head_params, layer_params
from ..model.modules import Rope
from .assembly import Assembly, Tile, tilings
from .student import ModularStudent


@dataclass
class RoutedOutput:
    logits: torch.Tensor
    layers: torch.Tensor                  # (B, T) layers each token executed
    lm_loss: Optional[torch.Tensor] = None
    router_loss: Optional[torch.Tensor] = None


class LearnedAssembly(nn.Module):
    def __init__(self, student: ModularStudent, segment: int, price: float):
        super().__init__()
        if segment not in student.granularities:
            raise ValueError(f"segment {segment} is not one of the granularities "
                             f"{list(student.granularities)}")
        self.student = student.requires_grad_(False).eval()
        self.segment, self.price = segment, price
        grains = tuple(g for g in student.granularities if segment % g == 0)
        local = sorted(tilings(segment, grains), key=len, reverse=True)  # the teacher's first
        self.paths: list[list[Assembly]] = [
            [tuple(Tile(k * segment + t.start, t.size) for t in path) for path in local]
            for k in range(student.n_layers // segment)]
        self.costs = torch.tensor([float(len(p)) for p in local])
        d = student.config.d_model
        self.routers = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, len(local)))
                                     for _ in self.paths)
        for router in self.routers:  # start as the teacher: every token on its own layers
            nn.init.zeros_(router[1].weight)
            with torch.no_grad():
                router[1].bias.copy_(torch.arange(len(local), 0, -1, dtype=torch.float) * 0.01)

    def _run(self, path: Assembly, x: torch.Tensor, keep: torch.Tensor,
             rope: Optional[Rope] = None) -> torch.Tensor:
        for tile in path:
            x = self.student.layer(tile)(x, keep=keep, rope=rope)
        return x

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None
                ) -> RoutedOutput:
        teacher = self.student.teacher
        B, T = input_ids.shape
        with torch.no_grad():
            x, rope = teacher.embed(input_ids, torch.arange(T, device=input_ids.device))
            states = [x]
            if self.training:
                for block in teacher.bottom:
                    states.append(block(states[-1], rope=rope))
        layers = torch.zeros(B, T, device=x.device)
        router_losses = []
        costs = self.costs.to(x.device)
        for k, (paths, router) in enumerate(zip(self.paths, self.routers)):
            scores = router(x.detach())
            choice = scores.argmax(dim=-1)
            with torch.no_grad():
                outs = torch.stack([self._run(path, x, choice == p, rope)
                                    for p, path in enumerate(paths)])  # (P, B, T, d)
            if self.training:
                end = states[(k + 1) * self.segment]
                error = ((outs - end) ** 2).mean(-1) / end.pow(2).mean()
                target = (error + self.price * costs[:, None, None] / self.segment).argmin(0)
                router_losses.append(F.cross_entropy(scores.reshape(B * T, -1),
                                                     target.reshape(-1)))
            x = outs.gather(0, choice[None, :, :, None].expand(1, B, T, x.shape[-1]))[0]
            layers = layers + costs[choice]
        logits = teacher.logits(x)
        out = RoutedOutput(logits=logits, layers=layers)
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                          labels.reshape(-1), ignore_index=-100)
        if router_losses:
            out.router_loss = torch.stack(router_losses).mean()
        return out

    def forward_flops_per_token(self, mean_layers: float, seq_len: int) -> float:
        """2 FLOPs per executed parameter (layers, routers, tied head) and 4 d T per
        attention (an upper bound: a token attends only to its path's tokens)."""
        cfg = self.student.config
        d = cfg.d_model
        layer, head = layer_params(cfg), head_params(cfg)
        routers = sum(p.numel() for p in self.routers.parameters())
        return 2.0 * (mean_layers * layer + routers + head) + 4.0 * d * seq_len * mean_layers


def fit_routers(model: LearnedAssembly, batches, steps: int, lr: float = 3e-3) -> list[float]:
    """Train the routers (AdamW, constant lr) on `steps` batches; returns the router losses."""
    optimizer = torch.optim.AdamW(model.routers.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    model.student.eval()
    history = []
    for _ in range(steps):
        x, _ = batches.next()
        loss = model(x).router_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
    return history
