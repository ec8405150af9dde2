"""Reading data prepared by mom-prep: memmapped token windows and a resumable sampler."""
from data_prep.format import DataError, read_meta
from data_prep.tokenizer import load_data_tokenizer

from .dataset import TokenizedDataset
from .sampler import WindowSampler

__all__ = ["DataError", "TokenizedDataset", "WindowSampler", "load_data_tokenizer", "read_meta"]
