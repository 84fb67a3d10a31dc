"""Exact resume: a run killed mid-epoch and resumed from ``last.ckpt`` trains on the same batches,
with the same masks and dropout, as the run that was never interrupted (same seed, CPU, fp32).

The interrupted run has the same ``max_steps`` as the uninterrupted one (the learning-rate
schedule depends on it) and is killed by an exception at the start of the step after its
checkpoint; the resumed run continues from that checkpoint into the next epoch. Per-step
training losses, recorded by a callback on every rank, must agree to 1e-6.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from hydra import compose, initialize_config_module

from slapo_lightning.cli.train import train

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KILL_AFTER, MAX_STEPS = 7, 24  # the checkpoint at step 7 is mid-epoch; 24 steps cross into the second epoch


class Killed(RuntimeError):
    """Stands for the process dying: nothing after the checkpoint is saved."""


class KillAt(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed(f"killed at step {self.step}")


class RecordLoss(pl.Callback):
    """Appends ``[global_step, loss, epoch]`` of every training batch to ``<path>.rank<r>``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as handle:
            handle.write(json.dumps([trainer.global_step, float(loss), trainer.current_epoch]) + "\n")


def overrides(recipe: str, run_dir: Path, cache_dir: Path, record: Path, kill: bool = False,
              ckpt: Path | None = None, kill_after: int = KILL_AFTER) -> list[str]:
    out = [
        f"recipe={recipe}", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", f"data.cache_dir={cache_dir}",
        "data.max_chars=12000", "data.vocab_size=500", "data.seq_len=32", "data.batch_size=8", "trainer=cpu",
        f"trainer.max_steps={MAX_STEPS}", f"trainer.val_check_interval={kill_after}", "trainer.limit_val_batches=2",
        "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "model.warmup_steps=3", "validate_after_fit=false",
        "+callbacks.record._target_=test_resume.RecordLoss", f"+callbacks.record.path={record}",
    ]
    if kill:
        out += ["+callbacks.kill._target_=test_resume.KillAt", f"+callbacks.kill.step={kill_after + 1}"]
    if ckpt is not None:
        out.append(f"ckpt_path={ckpt}")
    return out


def read(record: Path, rank: int = 0) -> dict[int, tuple[float, int]]:
    lines = Path(f"{record}.rank{rank}").read_text().splitlines()
    return {step: (loss, epoch) for step, loss, epoch in map(json.loads, lines)}


def compose_train(args: list[str]):
    with initialize_config_module("slapo_lightning.configs", version_base="1.3"):
        return compose("train", overrides=args)


def assert_resumed_exactly(whole: dict, first: dict, resumed: dict, kill_after: int = KILL_AFTER) -> None:
    assert sorted(first) == list(range(1, kill_after + 2)), sorted(first)  # killed before step kill_after + 2
    assert sorted(resumed) == list(range(kill_after + 1, MAX_STEPS + 1)), sorted(resumed)
    assert sorted(whole) == list(range(1, MAX_STEPS + 1))
    assert len({epoch for _, epoch in whole.values()}) >= 2, "the run must cross an epoch boundary"
    assert whole[kill_after + 1][1] == 0, "the checkpoint must be mid-epoch"
    for step in range(1, kill_after + 1):
        assert abs(first[step][0] - whole[step][0]) <= 1e-6, (step, first[step], whole[step])
    differences = {step: abs(resumed[step][0] - whole[step][0]) for step in resumed}
    assert max(differences.values()) <= 1e-6, differences
    assert all(resumed[step][1] == whole[step][1] for step in resumed), "epochs differ"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [pytest.param("gpt2", marks=pytest.mark.ci), "bert"])
def test_killed_and_resumed_run_repeats_the_uninterrupted_losses(recipe, tmp_path):
    cache = tmp_path / "cache"
    whole_record, first_record, resumed_record = tmp_path / "whole", tmp_path / "first", tmp_path / "resumed"
    train(compose_train(overrides(recipe, tmp_path / "whole_run", cache, whole_record)))
    with pytest.raises(Killed):
        train(compose_train(overrides(recipe, tmp_path / "first_run", cache, first_record, kill=True)))
    ckpt = tmp_path / "first_run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    train(compose_train(overrides(recipe, tmp_path / "resumed_run", cache, resumed_record, ckpt=ckpt)))
    assert_resumed_exactly(read(whole_record), read(first_record), read(resumed_record))


def run_cli(args: list[str], cwd: Path, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "slapo_lightning.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_ddp_killed_and_resumed_run_repeats_the_uninterrupted_losses(tmp_path):
    """Two gloo CPU processes (``strategy=ddp``): every rank resumes at its own shard's position."""
    cache = tmp_path / "cache"
    kill_after = 4  # each rank's shard is 6 batches an epoch
    ddp = ["trainer.devices=2", "+trainer.strategy=ddp", "~callbacks.cpu_allocator"]
    records = {name: tmp_path / name for name in ("whole", "first", "resumed")}
    runs = {name: tmp_path / f"{name}_run" for name in records}
    whole = run_cli(overrides("gpt2", runs["whole"], cache, records["whole"], kill_after=kill_after) + ddp, tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run_cli(overrides("gpt2", runs["first"], cache, records["first"], kill=True, kill_after=kill_after) + ddp,
                    tmp_path)
    assert first.returncode != 0 and "killed at step" in first.stderr, first.stderr[-3000:]
    ckpt = runs["first"] / "checkpoints" / "last.ckpt"
    resumed = run_cli(overrides("gpt2", runs["resumed"], cache, records["resumed"], ckpt=ckpt, kill_after=kill_after)
                      + ddp, tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        assert_resumed_exactly(*(read(records[name], rank) for name in ("whole", "first", "resumed")), kill_after)
    assert read(records["whole"], 0)[1] != read(records["whole"], 1)[1], "ranks train on different shards"
