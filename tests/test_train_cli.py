"""``slapo-train`` on the command line: bad input gives one ``error:`` line and exit code 2."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from slapo_lightning.cli.overrides import check_overrides
from slapo_lightning.cli.train import EXIT_USER_ERROR, main

REPO = Path(__file__).resolve().parents[1]


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["slapo-train", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipe=t5"], "unknown recipe 't5'; valid: bert, gpt2"),
        (["trainer=tpu"], "unknown trainer 'tpu'; valid: auto, cpu, ddp, gpu"),
        (["logger=[csv,wandb]"], "unknown logger 'wandb'; valid: csv, tensorboard"),
        (["schedule=none", "model.layers=4"], "unknown key 'model.layers': model has no 'layers' (valid: _target_, size,"),
        (["schedule=none", "schedule.passes.fused_qkv.enabled=false"], "schedule.passes has no 'fused_qkv' (valid: (none))"),
        (["schedule=none", "trainer.max_steps=many"], "bad value trainer.max_steps='many': Trainer takes an integer"),
        (["schedule=none", "data.val_fraction=[1]"], "bad value data.val_fraction=[1]: TextDataModule takes a number"),
        (["schedule=none", "trainer.precision=bf16mixed"], "bad value trainer.precision='bf16mixed': Trainer takes one of"),
        (["schedule=none", "model.size=7"], "bad value model.size=7: CausalLMModule takes a string"),
        (["trainer.max_steps=[1"], "cannot parse override 'trainer.max_steps=[1': no viable alternative"),
    ],
)
def test_bad_overrides_are_one_line_errors(monkeypatch, capsys, args, message):
    code, err = run_main(monkeypatch, capsys, *args)
    assert code == EXIT_USER_ERROR
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.size=huge"], "model.size='huge' is not a preset; valid: tiny, base, medium"),
        (["data.paths=[/no/such/corpus]"], "data.paths: '/no/such/corpus' does not exist"),
        (["ckpt_path=/no/such.ckpt"], "ckpt_path: '/no/such.ckpt' is not a checkpoint file"),
    ],
)
def test_bad_values_found_while_running_are_one_line_errors(monkeypatch, capsys, tmp_path, args, message):
    base = ["schedule=none", "~callbacks.schedule", f"hydra.run.dir={tmp_path}", f"data.cache_dir={tmp_path}",
            "data.max_chars=100000", "data.vocab_size=500"]
    code, err = run_main(monkeypatch, capsys, *base, *args)
    assert code == EXIT_USER_ERROR
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert "Traceback" not in err


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
    assert proc.stderr == "error: unknown recipe 'nope'; valid: bert, gpt2\n"


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
