"""Export trained weights in Hugging Face format, loadable by plain transformers."""
from __future__ import annotations

import copy
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..core.primitives.trace import original_use_cache


def export_pretrained(model: PreTrainedModel, directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Save ``model``'s weights with ``save_pretrained`` into ``directory`` (and the tokenizer).

    The weights go through a freshly built plain model loaded with ``strict=True``: whatever a
    schedule replaced, the export is the original architecture (and configuration), and a key
    mismatch fails here rather than when someone loads the directory.
    """
    directory = Path(directory).expanduser()
    config = copy.deepcopy(model.config)
    if original_use_cache(model) is not None:
        config.use_cache = original_use_cache(model)  # tracing turned it off for training only
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
