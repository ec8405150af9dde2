"""A mom-ds model as a Hugging Face model: `AutoModelForCausalLM` loads it, `generate()`
samples from it.

This file is shipped: `mom-convert to-hf` copies it, as modeling_mom.py, beside copies of
the model files it imports (hf_export.py), so an exported directory loads with
`trust_remote_code=True` and transformers alone. Its imports therefore stay inside
mom_ds/model: the same code runs in mom-ds and in the exported directory. It runs under
transformers 4.44 to 5.x (tests/model/test_hf_export_hf4.py): what differs between them is named
where it is handled.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import MoMConfig
from .model import MoMForCausalLM

MODEL_TYPE = "mom_ds"
# The name generate() gives the key/value cache in the model's inputs and outputs: transformers
# 5.25 renamed `past_key_values` to `cache`, and generate() passes on only the one it knows.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MoMHFConfig(PretrainedConfig):
    """`mom` holds the MoMConfig's fields; the other fields repeat the ones that
    transformers and lm-evaluation-harness look up by name."""

    model_type = MODEL_TYPE
    attribute_map = {"max_position_embeddings": "n_positions", "hidden_size": "d_model",
                     "num_attention_heads": "n_heads"}
    mom: Optional[dict] = None
    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_heads: int = 12
    # the head is wte itself (F.linear on wte.weight) or its own lm_head, never a second
    # tensor for transformers to tie
    tie_word_embeddings: bool = False

    @classmethod
    def of(cls, config: MoMConfig, **kwargs) -> "MoMHFConfig":
        return cls(mom=config.to_dict(), vocab_size=config.vocab_size,
                   n_positions=config.n_positions, d_model=config.d_model,
                   n_heads=config.n_heads, **kwargs)


class MoMHFForCausalLM(PreTrainedModel, GenerationMixin):
    """MoMForCausalLM under the name `model`. The loss follows transformers: `labels` are
    the input ids, shifted inside. Prompts of different lengths are padded on the left. Generation keeps mom-ds's own key/value cache (a dict)
    and routes MoD blocks by their causal threshold, as `MoMForCausalLM.generate` does."""

    config_class = MoMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"

    def __init__(self, config: MoMHFConfig):
        super().__init__(config)
        self.model = MoMForCausalLM(MoMConfig.from_dict(config.mom))
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """MoMForCausalLM initialises itself (GPT-2's scheme); from_pretrained then loads
        every tensor, so transformers has nothing to initialise."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # the cache is mom-ds's dict, made in prepare_inputs_for_generation (4.x calls this
        # on the instance, 5.x on the class: a classmethod answers both)
        return False

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.wte

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
                mod_routing: str = "topk", **kwargs) -> CausalLMOutputWithPast:
        """`cache` (mom-ds's dict) is also taken as `past_key_values`, the name of 4.x and
        of 5.x before 5.25; other keyword arguments of generate() are not used.
        attention_mask (B, past + T), 0 = padding: padding is never attended to nor routed
        (MoMForCausalLM.forward) and a padding token is no target of the loss."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        targets = None
        if labels is not None:
            if attention_mask is not None:
                labels = labels.masked_fill(attention_mask[:, -labels.shape[1]:] == 0, -100)
            # transformers' labels are the input ids; mom-ds's are the next tokens
            targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], 1)
        out = self.model(input_ids, labels=targets, attention_mask=attention_mask, cache=cache,
                         mod_routing=mod_routing)
        return CausalLMOutputWithPast(loss=out.lm_loss, logits=out.logits, **{CACHE: cache})

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: Optional[dict] = None,
                                      attention_mask: Optional[torch.Tensor] = None,
                                      use_cache: bool = True, **kwargs) -> dict:
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if use_cache and cache is None:
            cache = {}
        seen = cache.get("length", 0) if cache is not None else 0
        return {"input_ids": input_ids[:, seen:], "cache": cache,
                "attention_mask": attention_mask, "mod_routing": "threshold"}
