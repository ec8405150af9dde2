"""mom-ds: Mixture-of-Modules language models pre-trained on DeepSpeed."""
from .model import ConfigError, MoMConfig, MoMForCausalLM, MoMOutput

__version__ = "0.1.0"
__all__ = ["ConfigError", "MoMConfig", "MoMForCausalLM", "MoMOutput", "__version__"]
