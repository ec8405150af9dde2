"""mom-ds checkpoints on disk, below the trainer: the format (format.py: names, tags, the
manifest, reading and writing files), what a checkpoint directory publishes (published.py:
`latest`, `best.json`), and a trained model on one process (loading.py). No
torch.distributed and no DeepSpeed here: mom-train's collective save and load are
mom_ds/train/checkpoint.py, built on this package."""
