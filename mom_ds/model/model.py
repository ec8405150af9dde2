"""MoMForCausalLM: embeddings and positions, the layout of vanilla layers / routed blocks /
MoD blocks, the LM head (tied or not), the loss, and cached generation."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .checkpointing import MODES, checkpointed
from .config import MoMConfig
from .flops import flops_per_token
from .lm_loss import UntiedHead, head_and_loss
from .mod_block import MoDBlock, MoDRouting
from .modules import Rope, VanillaLayer, init_gpt2_, make_norm, rotary_tables
from .routed_block import RoutedBlock
from .routing import RoutingRecord


@dataclass
class MoMOutput:
    logits: Optional[torch.Tensor]          # None when the loss was chunked (lm_loss.py)
    loss: Optional[torch.Tensor] = None     # what to train on: lm_loss + coefs * routing losses
    lm_loss: Optional[torch.Tensor] = None  # cross-entropy only
    balance_loss: Optional[torch.Tensor] = None     # routers' balancing loss, unscaled
    mod_router_loss: Optional[torch.Tensor] = None  # MoD routers' BCE loss, unscaled
    # what the routing chose, summable (routing.py): FLOPs, monitor and report read this
    routing: Optional[RoutingRecord] = None  # always set by forward (fullgraph-compilable)
    # per-token detail of this forward: each MoD block's selection mask and BCE (the loss
    # takes the BCE; its counts are in `routing`)
    mod_routing: list[MoDRouting] = field(default_factory=list)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # logged as train/<name>


class MoMForCausalLM(nn.Module):
    def __init__(self, config: MoMConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.d_model
        self.wte = nn.Embedding(config.vocab_size, d)
        # positions: a learned table (gpt2) or rotary angles inside attention (llama)
        self.wpe = nn.Embedding(config.n_positions, d) if config.block == "gpt2" else None
        self.drop = nn.Dropout(config.dropout)
        mod_layers = set(config.mod_layer_indices())
        self.bottom = nn.ModuleList(
            MoDBlock(config) if i in mod_layers else self._vanilla() for i in range(config.n_bottom))
        self.chunks = nn.ModuleList(RoutedBlock(config) for _ in range(config.n_routed_blocks))
        self.anchors = nn.ModuleList(self._vanilla() for _ in range(config.n_routed_blocks)
                                     if config.anchor_layers)
        self.top = nn.ModuleList(self._vanilla() for _ in range(config.n_top))
        self.ln_f = make_norm(config)
        self.lm_head = None if config.tie_word_embeddings else UntiedHead(d, config.vocab_size)
        init_gpt2_(self, config.init_std, config.n_layer_equiv)
        self.activation_checkpointing = "none"  # set by set_activation_checkpointing

    def _vanilla(self) -> VanillaLayer:
        return VanillaLayer(self.config)

    def num_params(self, exclude_positions: bool = True) -> int:
        """Parameter count; nanoGPT leaves out the position table (gpt2 blocks; a tied head
        is counted once, as the embedding). (contract.py: TrainableLM.num_params)"""
        n = sum(p.numel() for p in self.parameters())
        return n - self.wpe.weight.numel() if exclude_positions and self.wpe is not None else n

    def _head(self, hidden: torch.Tensor, labels: Optional[torch.Tensor] = None,
              loss_chunk_tokens: int = 0
              ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(logits, loss) of the final norm's output (lm_loss.head_and_loss) through the
        head: the token embedding itself when tied."""
        if self.lm_head is None:
            return head_and_loss(hidden, self.wte.weight, labels, loss_chunk_tokens)
        return self.lm_head(hidden, labels, loss_chunk_tokens)

    def embed(self, input_ids: torch.Tensor, pos: torch.Tensor
              ) -> tuple[torch.Tensor, Optional[Rope]]:
        """The residual stream entering the first layer, and what the layers need to know
        of the positions pos ((T,) or (B, T)): the rotary tables (block llama; gpt2 adds
        its position table here and returns None)."""
        x = self.wte(input_ids)
        if self.wpe is not None:
            return self.drop(x + self.wpe(pos)), None
        c = self.config
        return self.drop(x), rotary_tables(pos, c.head_dim, c.rope_theta)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output -> logits: final norm and head."""
        return self._head(self.ln_f(x))[0]

    def per_module_tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter by name, each routed block's stacked pools as one view per module
        (chunks.<c>.attn_modules.<j>.qkv.weight, in nn.Linear layout): the names the
        two-stage map and per-module tools use. Writing into a view writes the stack."""
        tensors = {n: p for n, p in self.named_parameters() if "_pool." not in n}
        for c, block in enumerate(self.chunks):
            tensors.update(block.attn_pool.module_views(f"chunks.{c}.attn_modules"))
            tensors.update(block.ffn_pool.module_views(f"chunks.{c}.ffn_modules"))
        return tensors

    def set_activation_checkpointing(self, mode: str) -> None:
        """train.activation_checkpointing (checkpointing.py): none; layer (each vanilla /
        MoD layer and each routing step); block (each layer and each routed block whole)."""
        if mode not in MODES:
            raise ValueError(f"activation checkpointing {mode!r} is not one of {MODES}")
        self.activation_checkpointing = mode
        for block in self.chunks:
            block.checkpoint_steps = mode == "layer"

    def begin_step(self, step: int) -> None:
        """The training loop's call before each optimizer step; pre-training has no per-step
        schedule (the modular student draws its assembly here)."""

    def train_flops_per_token(self, seq_len: int, out: MoMOutput,
                              routing: Optional[RoutingRecord] = None) -> float:
        """Training FLOPs per token of the routing taken (flops.py): `routing` (a sum over
        micro-batches and ranks), else the forward's own out.routing."""
        return flops_per_token(self.config, seq_len, routing if routing is not None
                               else out.routing)

    # ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                attention_mask: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                mod_routing: str = "topk", loss_chunk_tokens: int = 0) -> MoMOutput:
        """input_ids (B, T). labels (B, T) are the targets at each position (already shifted,
        as nanoGPT's X/Y; -100 ignored). With a cache dict, positions continue after the
        tokens it holds and keys/values are appended to it. With labels and
        loss_chunk_tokens > 0 the head and the loss run that many tokens at a time and
        out.logits is None (the whole logits are never built).

        attention_mask (B, past + T), 1 = token, 0 = padding, as Hugging Face passes it:
        the tokens in the cache and these (so T columns without a cache). Padding (left
        padding in generation; any pattern in a forward) is no key to any query, takes no
        position (a token's position counts the tokens before it in its row), chooses no
        module and counts in no routing statistic, capacity or auxiliary loss, and its
        labels are ignored. A padding query's output is finite and meaningless."""
        B, T = input_ids.shape
        past = cache.get("length", 0) if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds model.n_positions = "
                             f"{self.config.n_positions}")
        real = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, past + T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; "
                                 f"expected ({B}, {past + T}): one column per token in the "
                                 f"cache ({past}) and per input token ({T})")
            real = attention_mask[:, past:].bool()
            if labels is not None:
                labels = labels.masked_fill(~real, -100)  # a padding position predicts nothing
        pos = self._positions(real, past, T, cache, input_ids.device)
        x, rope = self.embed(input_ids, pos)
        out = MoMOutput(logits=x)
        blocks = []
        # activations are recomputed in training only (generation's cache is filled once)
        checkpointing = self.activation_checkpointing != "none" and cache is None \
            and self.training and torch.is_grad_enabled()

        def run(layer: nn.Module, x: torch.Tensor, key: tuple, **kwargs):
            kwargs["rope"] = rope
            if checkpointing and not (isinstance(layer, RoutedBlock)
                                      and self.activation_checkpointing == "layer"):
                return checkpointed(functools.partial(layer, **kwargs), x)
            return layer(x, cache=cache, cache_key=key, **kwargs)

        for i, layer in enumerate(self.bottom):
            if isinstance(layer, MoDBlock):
                x, mod = run(layer, x, ("bottom", i), routing=mod_routing, real=real)
                out.mod_routing.append(mod)
            else:
                x = run(layer, x, ("bottom", i), keep=real)
        for c, block in enumerate(self.chunks):
            # under `layer` the block checkpoints each routing step itself
            x, routing = run(block, x, ("routed", c), real=real)
            blocks.append(routing)
            if self.config.anchor_layers:
                x = run(self.anchors[c], x, ("anchor", c), keep=real)
        for i, layer in enumerate(self.top):
            x = run(layer, x, ("top", i), keep=real)
        out.routing = self._record(blocks, out.mod_routing, real, x)
        if cache is not None:
            cache["length"] = past + T
        out.logits, out.lm_loss = self._head(self.ln_f(x), labels, loss_chunk_tokens)
        if labels is not None:
            self._add_routing_losses(out)
        return out

    @staticmethod
    def _record(blocks: list, mod: list[MoDRouting], real: Optional[torch.Tensor],
                x: torch.Tensor) -> RoutingRecord:
        """This forward's routing record: the blocks' records and the MoD blocks' counts."""
        if not mod:
            return RoutingRecord(blocks, x.new_zeros(0, dtype=torch.float64),
                                 x.new_zeros(0, dtype=torch.float64), calls=1)
        selected = torch.stack([m.selected.sum() for m in mod]).double()
        tokens = real.sum() if real is not None else \
            torch.tensor(mod[0].selected.numel(), device=x.device)
        return RoutingRecord(blocks, selected, tokens.double().expand(len(mod)).clone(),
                             calls=1)

    @staticmethod
    def _positions(real: Optional[torch.Tensor], past: int, T: int, cache: Optional[dict],
                   device: torch.device) -> torch.Tensor:
        """The position of each input token: past, past + 1, ... without padding; with it,
        the number of tokens before it in its row (Hugging Face's GPT-2 in generate:
        cumsum(mask) - 1), clamped at 0 for leading padding, whose position nothing sees.
        A cache that saw padding keeps each row's token count, so later calls continue
        from it with or without a mask."""
        before = cache.get("tokens") if cache is not None else None
        if real is None and before is None:
            return torch.arange(past, past + T, device=device)
        new = real.long() if real is not None else \
            torch.ones(before.shape[0], T, dtype=torch.long, device=device)
        counted = torch.cumsum(new, dim=1) + (before[:, None] if before is not None else past)
        if cache is not None:
            cache["tokens"] = counted[:, -1]
        return (counted - 1).clamp_min(0)

    def _add_routing_losses(self, out: MoMOutput) -> None:
        cfg = self.config
        zero = out.lm_loss.new_zeros(())
        learned = [r.balance_loss for r in out.routing.blocks]
        out.balance_loss = torch.cat(learned).mean() if learned else zero
        out.mod_router_loss = torch.stack([m.mod_router_loss for m in out.mod_routing]).mean() \
            if out.mod_routing else zero
        out.loss = (out.lm_loss + cfg.balance_loss_coef * out.balance_loss
                    + cfg.mod_router_loss_coef * out.mod_router_loss)
        out.terms = {"lm_loss": out.lm_loss, "balance_loss": out.balance_loss,
                     "mod_router_loss": out.mod_router_loss}

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *,
                 attention_mask: Optional[torch.Tensor] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 use_cache: bool = True, generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
        """Sample up to max_new_tokens after input_ids (B, T). temperature 0 is greedy.
        Sequences that produced eos_token_id keep emitting it until all have stopped.
        attention_mask (B, T): prompts of different lengths, padded on the left (0 = pad);
        each row then continues as its prompt alone would."""
        was_training = self.training
        self.eval()
        ids, mask = input_ids, attention_mask
        cache: Optional[dict] = {} if use_cache else None
        fresh = ids
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            if ids.shape[1] > self.config.n_positions:
                raise ValueError(f"generation reached model.n_positions = "
                                 f"{self.config.n_positions}; ask for fewer new tokens")
            logits = self(fresh if use_cache else ids, attention_mask=mask, cache=cache,
                          mod_routing="threshold").logits[:, -1, :].float()
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = done | (nxt == eos_token_id)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            fresh = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return ids


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """One token per row from logits (B, V): greedy, or softmax(logits / T) restricted to
    the top_k tokens and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
