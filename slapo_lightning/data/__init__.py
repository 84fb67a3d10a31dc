"""Text data for the recipes: corpus, local tokenizers, packing and the Lightning DataModule."""
from .datamodule import TextDataModule

__all__ = ["TextDataModule"]
