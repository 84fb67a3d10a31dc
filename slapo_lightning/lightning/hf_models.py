"""Build the Hugging Face model of a recipe: a size preset (random init) or a local pretrained directory."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from transformers import PretrainedConfig, PreTrainedModel

from ..errors import RecipeError, unknown


def preset_config(size: str, sizes: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The HF config fields of preset ``size``; an unknown size names the valid ones."""
    if size not in sizes:
        raise RecipeError(unknown("model.size preset", size, sizes))
    return dict(sizes[size])


def hf_classes(auto_class: Any, model_type: str | None, pretrained_path: str | None,
               default: tuple[type[PreTrainedModel], type[PretrainedConfig]]) -> tuple[type[PreTrainedModel], type[PretrainedConfig]]:
    """The model and config classes of ``model_type`` (an HF config ``model_type`` such as ``llama``)
    for ``auto_class`` (e.g. ``AutoModelForCausalLM``); a ``pretrained_path``'s own config.json names
    it instead; ``default`` when neither does, or when there is no ``auto_class`` (a module written
    for one architecture)."""
    from transformers import CONFIG_MAPPING

    if auto_class is None:
        return default
    if pretrained_path:
        config_file = Path(os.path.expanduser(pretrained_path)) / "config.json"
        if config_file.is_file():
            model_type = json.loads(config_file.read_text()).get("model_type", model_type)
    if model_type is None:
        return default
    if model_type not in CONFIG_MAPPING:
        raise RecipeError(unknown("model.model_type", model_type, sorted(CONFIG_MAPPING.keys())))
    config_class = CONFIG_MAPPING[model_type]
    try:
        return auto_class._model_mapping[config_class], config_class
    except KeyError:
        raise RecipeError(f"model.model_type={model_type!r} has no {auto_class.__name__} class in transformers") from None


def build_hf_model(
    model_class: type[PreTrainedModel],
    config_class: type[PretrainedConfig],
    size: str,
    sizes: Mapping[str, Mapping[str, Any]],
    config: Mapping[str, Any] | None,
    vocab_size: int | None,
    token_ids: Mapping[str, int] | None,
    pretrained_path: str | None,
    attn_implementation: str,
) -> PreTrainedModel:
    """A randomly initialised model from ``sizes[size]`` updated by ``config``, or the weights in
    ``pretrained_path`` (a local ``save_pretrained`` directory; the hub is never contacted)."""
    if pretrained_path:
        directory = Path(os.path.expanduser(pretrained_path))
        if not (directory / "config.json").is_file():
            raise RecipeError(f"model.pretrained_path: {pretrained_path!r} is not a directory with a config.json")
        model = model_class.from_pretrained(str(directory), attn_implementation=attn_implementation, local_files_only=True)
        if vocab_size is not None and vocab_size > model.config.vocab_size:
            raise RecipeError(
                f"model.pretrained_path: the model's vocabulary ({model.config.vocab_size}) is smaller than the "
                f"tokenizer's ({vocab_size}); use the tokenizer saved with it (data.tokenizer_path={pretrained_path})"
            )
        return model.train()  # from_pretrained returns eval mode, and Lightning keeps modules' modes
    fields = preset_config(size, sizes)
    fields.update(config or {})
    fields.update(token_ids or {})
    if vocab_size is not None:
        fields["vocab_size"] = vocab_size
    try:
        hf_config = config_class(**fields, attn_implementation=attn_implementation)
        return model_class(hf_config)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"model: cannot build {model_class.__name__} from {fields}: {exc}") from exc
