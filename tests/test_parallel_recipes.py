"""``slapo-train recipe=gpt2 trainer=fsdp`` and ``trainer=tp`` (2 gloo CPU processes under
Lightning's ModelParallelStrategy) with the shipped gpt2 schedule, fused cross-entropy included:
every step's loss equals one unscheduled process's on the same batches, and a run killed
mid-epoch resumes from its distributed checkpoint (a directory of shards with the original keys)
as if it had never stopped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_resume import MAX_STEPS, assert_resumed_exactly, overrides, read, run_cli

MODEL_CONFIG = Path(__file__).resolve().parents[1] / "slapo_lightning" / "configs" / "model" / "gpt2.yaml"
NO_DROPOUT = ["+model.config.resid_pdrop=0.0", "+model.config.embd_pdrop=0.0", "+model.config.attn_pdrop=0.0"]
BATCH = 8
STRATEGIES = {  # trainer -> (data-parallel ranks, checkpoint interval within an epoch)
    "fsdp": (2, 4),
    "tp": (1, 7),
}


def distributed_keys(checkpoint: Path) -> list[str]:
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    return sorted(k[len("state_dict."):] for k in metadata.state_dict_metadata if k.startswith("state_dict."))


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("trainer", [pytest.param("fsdp", marks=pytest.mark.ci), "tp"])
def test_recipe_trains_like_one_process_and_resumes_from_its_distributed_checkpoint(trainer, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    dp, kill_after = STRATEGIES[trainer]
    cache = tmp_path / "cache"
    records = {name: tmp_path / name for name in ("one", "whole", "first", "resumed")}
    runs = {name: tmp_path / f"{name}_run" for name in records}
    common = [*NO_DROPOUT, f"data.batch_size={BATCH}"]
    parallel = [f"trainer={trainer}", "trainer.accelerator=cpu"]

    def cli(name: str, extra: list[str], **kw):
        args = [a for a in overrides("gpt2", runs[name], cache, records[name], kill_after=kill_after, **kw)
                if not a.startswith(("trainer=", "data.batch_size="))]
        return run_cli(args + common + extra, tmp_path)

    one = cli("one", ["trainer=cpu", "schedule=none", f"data.batch_size={BATCH * dp}"])
    assert one.returncode == 0, one.stderr[-3000:]
    whole = cli("whole", [*parallel, "callbacks.schedule.verify=true"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "first-batch verification of 'model' passed" in whole.stdout + whole.stderr, "sharded, and checked whole"

    reference = read(records["one"])
    per_rank = [read(records["whole"], rank) for rank in (0, 1)]
    for step in range(1, MAX_STEPS + 1):
        losses = [ranks[step][0] for ranks in per_rank]
        seen = sum(losses[:dp]) / dp  # data-parallel ranks each see half the batch; tensor-parallel ranks all of it
        assert abs(seen - reference[step][0]) <= 2e-5 * reference[step][0], (step, losses, reference[step])
        if dp == 1:
            assert losses[0] == losses[1], "tensor-parallel ranks compute one loss"

    first = cli("first", parallel, kill=True)
    assert first.returncode != 0 and "killed at step" in first.stderr, first.stderr[-3000:]
    checkpoint = runs["first"] / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir(), "a distributed checkpoint"
    module = instantiate(OmegaConf.load(MODEL_CONFIG), _convert_="all", vocab_size=500)
    assert distributed_keys(checkpoint) == sorted(module.state_dict()), "the plain model's keys"
    resumed = cli("resumed", parallel, ckpt=checkpoint)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        assert_resumed_exactly(*(read(records[name], rank) for name in ("whole", "first", "resumed")), kill_after)
    report = json.loads((runs["whole"] / "logs" / "schedule_report.json").read_text())
    status = {p["name"]: p["status"] for p in report["passes"]}
    parallel_passes = {"fsdp": ("fsdp_layers", "fsdp_root"), "tp": ("tensor_parallel",)}[trainer]
    assert all(status[name] == "applied" for name in (*parallel_passes, "fused_cross_entropy")), status


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_llama_recipe_on_a_2x2_mesh_trains_like_one_process(tmp_path):
    """``recipe=llama`` (the auto schedule: megatron plan, then FSDP2) on 4 ranks, data_parallel=2 x
    tensor_parallel=2: global ranks 0 and 2 are the two data-parallel ranks."""
    cache = tmp_path / "cache"
    records = {name: tmp_path / name for name in ("one", "mesh")}

    def cli(name: str, extra: list[str]):
        args = [a for a in overrides("llama", tmp_path / f"{name}_run", cache, records[name])
                if not a.startswith(("trainer=", "data.batch_size="))]
        return run_cli(args + extra, tmp_path, timeout=900)

    one = cli("one", ["trainer=cpu", "schedule=none", f"data.batch_size={2 * BATCH}"])
    assert one.returncode == 0, one.stderr[-3000:]
    mesh = cli("mesh", ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=4", f"data.batch_size={BATCH}",
                        "trainer.strategy.data_parallel_size=2", "trainer.strategy.tensor_parallel_size=2"])
    assert mesh.returncode == 0, mesh.stderr[-3000:]
    reference = read(records["one"])
    ranks = [read(records["mesh"], rank) for rank in range(4)]
    for step in range(1, MAX_STEPS + 1):
        assert ranks[0][step][0] == ranks[1][step][0] and ranks[2][step][0] == ranks[3][step][0], "one loss per TP group"
        seen = (ranks[0][step][0] + ranks[2][step][0]) / 2
        assert abs(seen - reference[step][0]) <= 2e-5 * reference[step][0], (step, seen, reference[step])
    report = json.loads((tmp_path / "mesh_run" / "logs" / "schedule_report.json").read_text())
    status = {p["name"]: p["status"] for p in report["passes"]}
    assert all(status[name] == "applied" for name in ("tensor_parallel", "fsdp_layers", "fsdp_root",
                                                       "flash_attention", "fused_cross_entropy")), status
