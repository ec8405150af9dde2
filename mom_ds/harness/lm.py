"""A mom-ds model as an lm-evaluation-harness language model (`lm_eval.api.model.LM`).

Text is encoded with the run's own data tokenizer (as the model was trained), and scored
the way the harness's HFLM scores a causal model: a continuation's log-likelihood given its
context (a context's trailing spaces move to the continuation, an empty context is
end-of-text), rolling windows of n_positions for perplexity tasks, and greedy or sampled
generation cut at the task's stop strings.

Scoring batches are padded on the right. That leaves every real token's logits as they are
alone because attention is causal, a MoD block routes by its causal threshold here (as in
generation, not the training-time top-k over the sequence), and dropless routing treats each
token alone. A model whose routed blocks drop tokens past a capacity (capacity_factor > 0)
makes tokens compete within a batch, so it is scored one sequence at a time. Generation
batches prompts of any lengths padded on the left, with their attention mask.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from ..model import MoMForCausalLM

DEFAULT_MAX_GEN_TOKS = 256


class MoMHarnessLM(LM):
    def __init__(self, model: MoMForCausalLM, tokenizer, batch_size: int = 8):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer  # data_prep Tokenizer: encode (no special tokens), decode
        self.eot = tokenizer.info.eot_id
        self.max_length = model.config.n_positions
        self.batch_size = 1 if model.config.capacity_factor > 0 else batch_size
        self.model_device = next(model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer.encode(text)]

    # --- scoring ------------------------------------------------------------------------
    @torch.no_grad()
    def _continuation_logprobs(self, pairs: Sequence[tuple[list[int], list[int]]]
                               ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives it) for
        each (context ids, continuation ids), the inputs cut to the last n_positions."""
        results: list[Optional[tuple[float, bool]]] = [None] * len(pairs)
        # longest first: a batch's padding stays small, and a too-long input fails at once
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for batch in _chunks(order, self.batch_size):
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.eot, dtype=torch.long)
            for j, row in enumerate(rows):
                ids[j, :len(row)] = torch.tensor(row)
            logits = self.model(ids.to(self.model_device), mod_routing="threshold").logits
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for j, i in enumerate(batch):
                cont = torch.tensor(pairs[i][1], device=self.model_device)
                end = len(rows[j])
                scores = logprobs[j, end - len(cont):end]
                taken = scores.gather(1, cont[:, None]).squeeze(1)
                results[i] = (float(taken.sum()), bool((scores.argmax(-1) == cont).all()))
        return results  # type: ignore[return-value]

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:  # "Q: x " + "A" scores " A", as HFLM does
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = self.encode(context + continuation)
        head = self.encode(context) if context else []
        return ([self.eot] if not head else head), whole[len(head):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._split(*r.args) for r in requests]
        return self._continuation_logprobs(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owners = [], []
        for n, request in enumerate(requests):
            for window in get_rolling_token_windows(self.encode(request.args[0]), self.eot,
                                                    self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._continuation_logprobs(windows)):
            totals[owner] += score
        return totals

    # --- generation ---------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        """Requests with the same generation settings go in batches, longest prompt first,
        padded on the left (attention_mask 0): each row continues as its prompt alone would
        (MoMForCausalLM.generate)."""
        outputs: list[Optional[str]] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        prompts = []
        for n, request in enumerate(requests):
            context, settings = request.args
            settings = dict(settings or {})
            # prompt + new tokens fit n_positions; the prompt keeps at least one token
            limit = min(int(settings.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
                        self.max_length - 1)
            ids = self.encode(context)[-(self.max_length - limit):] or [self.eot]
            prompts.append(ids)
            groups.setdefault((limit, repr(sorted(settings.items()))), []).append(n)
        for (limit, _), members in groups.items():
            settings = dict(requests[members[0]].args[1] or {})
            stops = _stop_strings(settings.get("until"))
            members.sort(key=lambda n: -len(prompts[n]))  # less padding in each batch
            for batch in _chunks(members, self.batch_size):
                width = len(prompts[batch[0]])
                pads = [width - len(prompts[n]) for n in batch]
                prompt = torch.tensor([[self.eot] * pad + prompts[n]
                                       for pad, n in zip(pads, batch)], device=self.model_device)
                mask = torch.tensor([[0] * pad + [1] * (width - pad) for pad in pads],
                                    device=self.model_device)
                new = self._generate(prompt, mask, limit, settings)
                for n, ids in zip(batch, new):
                    outputs[n] = _cut(self.tokenizer.decode(ids), stops)
        return outputs  # type: ignore[return-value]

    def _generate(self, prompt: torch.Tensor, mask: torch.Tensor, limit: int,
                  settings: dict) -> list[list[int]]:
        sample = bool(settings.get("do_sample", False))
        temperature = float(settings.get("temperature", 1.0 if sample else 0.0))
        out = self.model.generate(prompt, limit, attention_mask=mask,
                                  temperature=temperature if sample else 0.0,
                                  top_p=settings.get("top_p"), top_k=settings.get("top_k"),
                                  eos_token_id=self.eot)
        new = out[:, prompt.shape[1]:].tolist()
        return [row[:row.index(self.eot)] if self.eot in row else row for row in new]


def _chunks(items: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _stop_strings(until: Optional[Iterable[str] | str]) -> list[str]:
    if until is None:
        return []
    return [until] if isinstance(until, str) else list(until)


def _cut(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string."""
    for stop in stops:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text
