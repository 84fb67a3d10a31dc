"""An exported scheduled model has the original configuration (tracing's use_cache=False stays out)."""
from __future__ import annotations

import json

import slapo_lightning as slapo
import tiny_models
from slapo_lightning.lightning.export import export_pretrained


def test_export_restores_use_cache(tmp_path):
    model = tiny_models.gpt2()
    slapo.apply_schedule(model, "gpt2")
    assert model.config.use_cache is False
    export_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True
