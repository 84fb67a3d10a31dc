"""``slapo-train`` on the command line: accepted values, ``--help``, the user's own schedule files and
the console module. The one-line errors are in ``test_cli_errors.py``."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slapo_lightning.cli.overrides import check_overrides
from slapo_lightning.cli.train import EXIT_USER_ERROR, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "override",
    ["trainer.devices=auto", "trainer.val_check_interval=0.5", "callbacks.schedule.verify=first_batch",
     "model.lr=1", "data.paths=[a.txt]", "trainer.max_steps=${seed}"],
)
def test_values_of_any_accepted_type_pass(override):
    check_overrides(["schedule=none", override])


def test_console_module_reports_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "slapo_lightning.cli", "recipe=nope"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr == "error: unknown recipe 'nope'; valid: bert, gpt2, llama\n"


@pytest.mark.slow
def test_console_module_trains_a_recipe(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLAPO_CACHE_DIR": str(tmp_path / "cache")}
    from test_train_recipes import schedule_overrides

    proc = subprocess.run(
        [sys.executable, "-m", "slapo_lightning.cli", "recipe=gpt2", "trainer.max_steps=3",
         "trainer.val_check_interval=3", "trainer.limit_val_batches=2", "data.max_chars=100000",
         "data.vocab_size=500", "~callbacks.progress", "trainer.enable_progress_bar=false",
         *schedule_overrides("gpt2")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "last checkpoint:" in proc.stdout and "validation perplexity:" in proc.stdout
    run_dirs = list((tmp_path / "outputs" / "gpt2").iterdir())
    assert len(run_dirs) == 1 and (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()
    assert (run_dirs[0] / "logs" / "metrics.csv").is_file()


def test_help_says_what_the_program_is_with_recipes_and_examples(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["slapo-train", "--help"])
    with pytest.raises(SystemExit):
        main()
    out = capsys.readouterr().out
    assert out.startswith("slapo-train: train a Hugging Face transformer with PyTorch Lightning")
    assert "powered by Hydra" not in out
    assert "Recipes (recipe=NAME): gpt2 (causal LM, the default), bert (masked LM)" in out
    assert "slapo-train recipe=gpt2 schedule=/path/to/my_schedule.yaml" in out
    assert "recipe: bert, gpt2" in out  # the config groups


MY_SCHEDULE = """
passes:
  my_mlp:
    select: "transformer.h.*.mlp"
    steps:
      - replace: {op: fused_mlp}
  my_attention:
    select: "transformer.h.*.attn"
    backend: sdpa
    steps:
      - trace: {}
      - replace: {pattern: attention, op: flash_attention, backend: $backend}
"""


def test_a_schedule_file_from_the_command_line_is_the_composed_schedule(tmp_path):
    from slapo_lightning.cli.overrides import schedule_file_overrides

    path = tmp_path / "my.yaml"
    path.write_text(MY_SCHEDULE)
    overrides = schedule_file_overrides([f"schedule={path}", "schedule.passes.my_mlp.enabled=false",
                                         "schedule.passes.my_attention.backend=math"])
    cfg = check_overrides(overrides)
    passes = cfg.schedule.passes
    assert list(passes) == ["my_mlp", "my_attention"]
    assert passes.my_mlp.enabled is False and passes.my_attention.backend == "math"
    assert passes.my_attention.steps[1].replace.backend == "$backend"
    assert cfg.callbacks.schedule.schedule.passes.my_attention.backend == "math"
    assert schedule_file_overrides(["schedule=gpt2"]) == ["schedule=gpt2"]


@pytest.mark.parametrize("how", ["schedule", "callbacks.schedule.schedule"])
def test_a_users_schedule_file_trains(how, tmp_path):
    """Both ways of naming a spec file on the command line schedule the model with it."""
    import json

    path = tmp_path / "my.yaml"
    path.write_text(MY_SCHEDULE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "SLAPO_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "slapo_lightning.cli", "recipe=gpt2", f"{how}={path}", "trainer.fast_dev_run=true",
         "data.max_chars=20000", "data.vocab_size=500", "trainer.enable_progress_bar=false",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (report_file,) = (tmp_path / "run").rglob("schedule_report.json")
    report = json.loads(report_file.read_text())
    assert [p["name"] for p in report["passes"] if p["status"] == "applied"] == ["my_mlp", "my_attention"]


def test_shipped_schedules_resolve_by_name():
    from omegaconf import OmegaConf

    from slapo_lightning.spec import load_spec

    shipped = Path(__file__).resolve().parents[1] / "slapo_lightning" / "configs" / "schedule"
    for name in ("gpt2", "bert", "none"):
        assert load_spec(name) == load_spec(OmegaConf.load(shipped / f"{name}.yaml"))
    assert [p.name for p in load_spec("gpt2").enabled][:3] == ["tensor_parallel", "flash_attention", "fused_mlp"]
