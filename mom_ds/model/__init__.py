"""The Mixture-of-Modules model: config, blocks, routers, presets, HF interop, FLOPs."""
from .config import ConfigError, MoMConfig
from .model import MoMForCausalLM, MoMOutput

__all__ = ["ConfigError", "MoMConfig", "MoMForCausalLM", "MoMOutput"]
