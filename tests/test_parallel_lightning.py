"""The callback under Lightning's ModelParallelStrategy (2 gloo CPU processes): the schedule's
tensor-parallel or FSDP2 passes apply over the strategy's device mesh inside configure_model,
training matches one unscheduled process, a full checkpoint keeps the original keys and loads
strictly into a plain model, and a resumed run continues exactly.

Lightning launches the extra rank by re-running the script, so each run lives in this file's
``__main__`` and the tests start it in a fresh interpreter.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
BATCHES, LR = 6, 0.05


def llama():
    """The tiny Llama of the architecture fixtures (2 layers, 4 query / 2 key-value heads), on sdpa."""
    import decoder_models

    return decoder_models.build("llama", "sdpa")


def batches() -> list[dict]:
    generator = torch.Generator().manual_seed(5)
    found = []
    for i in range(BATCHES):
        ids = torch.randint(0, 101, (2, 10), generator=generator)
        mask = torch.ones_like(ids)
        if i % 2:
            mask[1, 7:] = 0
        found.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return found


def make_module():
    import lightning.pytorch as pl

    class CausalLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = llama()
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            return self.model(**batch).loss

        def on_train_batch_end(self, outputs, batch, batch_idx):  # not in training_step: verification runs that
            self.losses.append(float(outputs["loss"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)

    return CausalLM()


class Loader:
    """This rank's batches in order, as a stateful loader: Lightning saves how many were yielded
    in the checkpoint and a resumed run continues after them (the test controls the order)."""

    def __init__(self, rank_batches: list[dict]):
        self.items, self.start, self.yielded = rank_batches, 0, 0

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        start, self.start = self.start, 0
        for self.yielded in range(start + 1, len(self.items) + 1):
            yield self.items[self.yielded - 1]

    def state_dict(self) -> dict:
        return {"yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.start = state["yielded"]


def loader(dp_rank: int, dp: int) -> Loader:
    """Each data-parallel rank gets every dp-th batch."""
    return Loader(batches()[dp_rank::dp])


def loosen_final_norm(sch) -> None:
    """A user's pass that changes what the model computes (keys unchanged): verification must see it."""
    sch.mod.model.norm.variance_epsilon = 0.5


def run(dp: int, tp: int, out: Path, max_steps: int, ckpt: str | None, full: bool, verify: bool) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    import slapo_lightning as slapo

    strategy = ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp,
                                     save_distributed_checkpoint=not full)
    module = make_module()
    callback = slapo.ScheduleCallback(str(out / "spec.yaml"), print_report=False, report_path=str(out / "report.json"),
                                      verify=verify)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return loader(module.device_mesh["data_parallel"].get_local_rank(), dp)

    trainer = pl.Trainer(accelerator="cpu", devices=dp * tp, strategy=strategy, max_steps=max_steps, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=out, callbacks=[callback], enable_checkpointing=False)
    trainer.fit(module, datamodule=Data(), ckpt_path=ckpt)
    trainer.save_checkpoint(out / "last.ckpt")
    if trainer.is_global_zero:
        (out / "losses.json").write_text(json.dumps(module.losses))


def start(dp: int, tp: int, out: Path, max_steps: int, ckpt: Path | None = None, full: bool = False,
          verify: bool = False, perturb: bool = False) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    write_spec(out, perturb)
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, __file__, str(dp), str(tp), str(out), str(max_steps), str(ckpt or ""),
                           "full" if full else "distributed", "verify" if verify else "-"], capture_output=True,
                          text=True, timeout=500, env=env, cwd=out)


def launch(dp: int, tp: int, out: Path, max_steps: int, ckpt: Path | None = None, full: bool = False,
           verify: bool = False) -> list[float]:
    done = start(dp, tp, out, max_steps, ckpt, full, verify)
    assert done.returncode == 0, done.stderr[-4000:]
    if verify:
        assert "first-batch verification of 'model' passed" in done.stdout + done.stderr
    return json.loads((out / "losses.json").read_text())


def reference_losses(dp: int, steps: int) -> list[float]:
    """One process, no schedule, trained on the mean of each step's dp batches; returns the loss
    of data-parallel rank 0's batch per step (what rank 0 of the distributed run logs)."""
    model = llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    per_rank = [batches()[r::dp] for r in range(dp)]
    rank0 = []
    for step in range(steps):
        losses = [model(**per_rank[r][step]).loss for r in range(dp)]
        (sum(losses) / dp).backward()
        optimizer.step()
        optimizer.zero_grad()
        rank0.append(losses[0].item())
    return rank0


def write_spec(out: Path, perturb: bool = False) -> None:
    """Tensor parallelism for the layers, then FSDP2 for the layers and the root: one spec for
    every mesh (a pass whose mesh dimension is 1 is skipped); ``perturb`` adds a pass that changes
    what the model computes."""
    import yaml

    plan = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
            "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
            "mlp.down_proj": "rowwise"}
    (out / "spec.yaml").write_text(yaml.safe_dump({"passes": {
        "tensor_parallel": {"select": "model.layers.*", "steps": [{"parallelize": {"plan": plan}}]},
        "fsdp_layers": {"select": "model.layers.*", "steps": [{"fully_shard": {}}]},
        "fsdp_root": {"steps": [{"fully_shard": {}}]},
        **({"loosen": {"fn": "test_parallel_lightning.loosen_final_norm"}} if perturb else {})}}))


@pytest.mark.timeout(900)
def test_tensor_parallel_fit_matches_one_process_and_its_full_checkpoint_loads_into_a_plain_model(tmp_path):
    losses = launch(1, 2, tmp_path / "tp", max_steps=3, full=True, verify=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses(1, 3)), rtol=1e-6, atol=1e-6)
    report = json.loads((tmp_path / "tp" / "report.json").read_text())
    assert {p["name"]: p["status"] for p in report["passes"]} == {
        "tensor_parallel": "applied", "fsdp_layers": "skipped", "fsdp_root": "skipped"}
    state = torch.load(tmp_path / "tp" / "last.ckpt", weights_only=False)["state_dict"]
    plain = make_module()
    plain.load_state_dict(state, strict=True)
    assert list(state) == list(make_module().state_dict())


@pytest.mark.timeout(900)
def test_first_batch_verification_under_fsdp_passes_and_catches_a_pass_that_changes_the_model(tmp_path):
    """The sharded model's outputs and gradients (averaged over the data-parallel ranks) against an
    unsharded copy on each rank's batch; a pass that changes the computation stops every rank."""
    losses = launch(2, 1, tmp_path / "fsdp", max_steps=1, verify=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses(2, 1)), rtol=1e-6, atol=1e-6)
    broken = start(2, 1, tmp_path / "broken", max_steps=1, verify=True, perturb=True)
    assert broken.returncode != 0
    assert "scheduled model differs from the original" in broken.stderr, broken.stderr[-3000:]
    assert "verify the schedule on one device" in broken.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_fsdp_fit_matches_one_process_and_resumes_exactly(tmp_path):
    losses = launch(2, 1, tmp_path / "fsdp", max_steps=3)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference_losses(2, 3)), rtol=1e-6, atol=1e-6)
    first = launch(2, 1, tmp_path / "first", max_steps=2)
    resumed = launch(2, 1, tmp_path / "second", max_steps=3, ckpt=tmp_path / "first" / "last.ckpt")
    assert len(first) == 2 and len(resumed) == 1
    torch.testing.assert_close(torch.tensor(first + resumed), torch.tensor(losses), rtol=1e-6, atol=1e-6)


if __name__ == "__main__" and len(sys.argv) == 8:
    dp_, tp_, out_, steps_, ckpt_, kind_, verify_ = sys.argv[1:]
    run(int(dp_), int(tp_), Path(out_), int(steps_), ckpt_ or None, kind_ == "full", verify_ == "verify")
