"""mom-ds: Mixture-of-Modules language models pre-trained on DeepSpeed."""
from typing import Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "MoMConfig", "MoMForCausalLM", "MoMOutput", "__version__"]


def __getattr__(name: str) -> Any:
    """The model's names, imported on first use: a command that never builds a model (mom-prep,
    an error message) does not pay for importing torch."""
    if name in __all__[:-1]:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'mom_ds' has no attribute {name!r}")
