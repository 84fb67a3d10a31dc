"""Two CPU processes (gloo, strategy="ddp") train the tiny BERT under the shipped schedule with
first-batch verification: every rank schedules before DDP wraps the model, and the ranks end with
the same weights.

Lightning's DDP launcher re-runs the launching script once per extra rank, so the run lives in
this file's ``__main__`` and the test starts it in a fresh interpreter.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run(out: Path, fail_rank: int | None = None) -> None:
    """Train; with ``fail_rank``, the bias_gelu replacement is wrong on that rank only, and every
    rank records the error that stopped it."""
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    import slapo_lightning as slapo
    from slapo_lightning.errors import VerificationError
    from slapo_lightning.lightning import MaskedLMModule
    from slapo_lightning.op import FusedQKV
    from slapo_lightning.spec import register_op_factory

    import tiny_models as fx

    class WrongOnOneRank(torch.nn.Module):
        def forward(self, x, bias):
            wrong = torch.distributed.is_initialized() and torch.distributed.get_rank() == fail_rank
            return F.gelu(x + bias) * (1.5 if wrong else 1.0)

    spec = fx.BERT_SPEC
    if fail_rank is not None:
        register_op_factory("test_wrong_gelu_on_one_rank", lambda match: WrongOnOneRank(), overwrite=True)
        spec = OmegaConf.to_container(OmegaConf.load(fx.BERT_SPEC))
        spec["passes"]["bias_gelu"]["steps"][-1]["replace"]["op"] = "test_wrong_gelu_on_one_rank"

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.wrapper = type(trainer.strategy.model).__name__

    probe = Probe()
    torch.manual_seed(0)
    module = MaskedLMModule(sizes=fx.BERT_SIZES, vocab_size=fx.VOCAB, warmup_steps=1)
    callback = slapo.ScheduleCallback(spec, verify="first_batch", print_report=False)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=out, callbacks=[callback, probe])
    if fail_rank is not None:
        try:
            trainer.fit(module, DataLoader(fx.training_batches(4, mlm=True), batch_size=None))
        except VerificationError as exc:
            result = {"rank": trainer.global_rank, "steps": trainer.global_step, "error": str(exc)}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
        return
    trainer.fit(module, DataLoader(fx.training_batches(4, mlm=True), batch_size=None))
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    result = {"rank": trainer.global_rank, "steps": trainer.global_step, "weights": digest.hexdigest(),
              "fused_qkv": sum(isinstance(m, FusedQKV) for m in module.model.modules()),
              "optimizer_holds_model": optimizer == {id(p) for p in module.parameters()},
              "ddp": probe.wrapper}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def launch(out: Path, *args: str, timeout: int = 600) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(out), *args], env=env, cwd=out,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.ci
def test_two_process_ddp_trains_with_the_schedule(tmp_path):
    launch(tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["steps"] == 2 and result["fused_qkv"] == 2 and result["optimizer_holds_model"]
        assert result["ddp"] == "DistributedDataParallel"
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert (tmp_path / "schedule_report.json").is_file()


@pytest.mark.slow
@pytest.mark.ci
def test_verification_failing_on_one_rank_stops_every_rank(tmp_path):
    """Rank 1's batch fails verification; rank 0's passes, yet it must not go on into DDP's
    collectives (where it would wait for rank 1 forever): both ranks stop before the first step."""
    launch(tmp_path, "1", timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(result["steps"] == 0 for result in ranks)
    assert "schedule pass 'bias_gelu' breaks equivalence" in ranks[1]["error"]
    assert "first-batch verification of 'model' failed on another rank" in ranks[0]["error"]


if __name__ == "__main__":
    run(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else None)
