"""Tensor parallelism and FSDP2 from a schedule, with 2 (and 4) gloo processes on CPU: over a few
steps the scheduled distributed run's losses and parameters equal one process's unscheduled run.

Each case runs under ``torch.distributed.run`` in fresh interpreters (this file's ``__main__``);
the test compares what rank 0 wrote with a single-process reference computed here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
STEPS, LR = 3, 0.1
LAYERS = "model.layers.*"

TP_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
           "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
           "mlp.down_proj": "rowwise"}
SPEC = {"passes": {
    "tensor_parallel": {"select": LAYERS, "steps": [{"parallelize": {"plan": TP_PLAN}}]},
    "tensor_parallel_vocab": {"steps": [{"parallelize": {"plan": {"model.embed_tokens": "vocab_embedding",
                                                                  "lm_head": "colwise_gathered"}}}]},
    "fsdp_layers": {"select": LAYERS, "steps": [{"fully_shard": {}}]},
    "fsdp_root": {"steps": [{"fully_shard": {}}]},
}}


SEQUENCE_PLAN = {"input_layernorm": "sequence", "post_attention_layernorm": "sequence",
                 "self_attn.q_proj": "colwise_from_sequence", "self_attn.k_proj": "colwise_from_sequence",
                 "self_attn.v_proj": "colwise_from_sequence", "self_attn.o_proj": "rowwise_to_sequence",
                 "mlp.gate_proj": "colwise_from_sequence", "mlp.up_proj": "colwise_from_sequence",
                 "mlp.down_proj": "rowwise_to_sequence"}
SEQUENCE_SPEC = {"passes": {
    "sequence_parallel": {"select": LAYERS, "steps": [{"parallelize": {"plan": SEQUENCE_PLAN}}]},
    "sequence_parallel_ends": {"steps": [{"parallelize": {"plan": {
        "model.embed_tokens": "vocab_embedding_to_sequence", "model.norm": "sequence",
        "lm_head": "colwise_from_sequence_gathered"}}}]},
}}


def llama():
    """The tiny Llama of the architecture fixtures (2 layers, 4 query / 2 key-value heads), on sdpa."""
    import decoder_models

    return decoder_models.build("llama", "sdpa")


def batch(data_rank: int) -> dict:
    """Each data-parallel rank's batch (padded on row 1), the same for every step."""
    generator = torch.Generator().manual_seed(10 + data_rank)
    ids = torch.randint(0, 101, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(model, batches: list[dict], steps: int = STEPS) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = sum(model(**b).loss for b in batches) / len(batches)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def full_state(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def worker(dp: int, tp: int, out: Path, spec: dict = SPEC) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import slapo_lightning as slapo

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = llama()
    keys = list(model.state_dict())
    report = slapo.apply_schedule(model, spec, device_mesh=mesh)
    data_rank = mesh["data_parallel"].get_local_rank()
    losses = train(model, [batch(data_rank)])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses)
    state = full_state(model)
    if rank == 0:
        torch.save({"losses": gathered, "state": state, "keys": list(state), "keys_before": keys,
                    "status": {p.name: p.status for p in report.passes},
                    "skipped": {p.name: [s.reason for s in p.skipped] for p in report.passes}}, out)
    dist.barrier()  # no rank leaves while another still talks to it (gloo aborts)
    dist.destroy_process_group()


def slapo_style_worker(out: Path) -> None:
    """Slapo's tutorial API on a tensor-parallel mesh: shard weights by axis, check the syncs."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import slapo_lightning as slapo

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",))
    model = llama()
    sch = slapo.create_schedule(model, device_mesh=mesh)
    errors = []
    for layer in sch.select(LAYERS):
        for name in ("q_proj", "k_proj", "v_proj"):
            layer[f"self_attn.{name}"].shard("weight", axis=0)
            layer[f"self_attn.{name}"].sync(mode="bwd_post")
        layer["self_attn.o_proj"].shard("weight", axis=1)
        layer["self_attn.o_proj"].sync(mode="fwd_post")
        for name in ("gate_proj", "up_proj"):
            layer[f"mlp.{name}"].shard("weight", axis=0)
        layer["mlp.down_proj"].shard("weight", axis=1)
        layer["mlp.down_proj"].sync(mode="fwd_post")
    for wrong in (lambda: sch["model.layers.0.mlp.gate_proj"].sync(mode="fwd_post"),
                  lambda: sch["model.layers.0.mlp.down_proj"].shard("weight", axis=0),
                  lambda: sch["model.layers.0.input_layernorm"].shard("weight", axis=0)):
        try:
            wrong()
        except slapo.ScheduleError as exc:
            errors.append(str(exc))
    losses = train(model, [batch(0)])
    state = full_state(model)
    if dist.get_rank() == 0:
        torch.save({"losses": [losses], "state": state, "keys": list(state), "keys_before": list(state),
                    "errors": errors}, out)
    dist.barrier()  # no rank leaves while another still talks to it (gloo aborts)
    dist.destroy_process_group()


def launch(dp: int, tp: int, out: Path, timeout: int = 300, mode: str = "spec") -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dp * tp),
                           "--standalone", __file__, f"--{mode}", str(dp), str(tp),
                           str(out)], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


def reference(dp: int) -> tuple[list[float], dict]:
    model = llama()
    losses = train(model, [batch(r) for r in range(dp)])
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_run(result: dict, dp: int) -> None:
    losses, state = reference(dp)
    per_rank = torch.tensor(result["losses"])
    tp = len(per_rank) // dp
    for group in per_rank.reshape(dp, tp, -1):  # the ranks of one tensor-parallel group agree
        torch.testing.assert_close(group, group[:1].expand_as(group), rtol=0, atol=0)
    mean_losses = per_rank.reshape(dp, tp, -1)[:, 0].mean(0)
    torch.testing.assert_close(mean_losses, torch.tensor(losses), rtol=1e-6, atol=1e-6)
    assert result["keys"] == result["keys_before"] == list(state)
    for key, value in state.items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


@pytest.mark.timeout(600)
def test_tensor_parallel_2_trains_like_one_process(tmp_path):
    result = launch(1, 2, tmp_path / "tp.pt")
    assert result["status"] == {"tensor_parallel": "applied", "tensor_parallel_vocab": "applied",
                                "fsdp_layers": "skipped", "fsdp_root": "skipped"}
    assert "no 'data_parallel' dimension larger than 1" in result["skipped"]["fsdp_root"][0]
    assert_same_run(result, dp=1)


@pytest.mark.timeout(600)
def test_fsdp_2_trains_like_one_process_on_both_batches(tmp_path):
    result = launch(2, 1, tmp_path / "fsdp.pt")
    assert result["status"] == {"tensor_parallel": "skipped", "tensor_parallel_vocab": "skipped",
                                "fsdp_layers": "applied", "fsdp_root": "applied"}
    assert_same_run(result, dp=2)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_2x2_mesh_tensor_parallel_and_fsdp_train_like_one_process(tmp_path):
    result = launch(2, 2, tmp_path / "2x2.pt", timeout=800)
    assert set(result["status"].values()) == {"applied"}
    assert_same_run(result, dp=2)


@pytest.mark.timeout(600)
def test_sequence_parallel_2_trains_like_one_process(tmp_path):
    """Norms on sequence shards, projections gathering / scattering the sequence, the embedding
    scattering it and the head gathering it again (positions and masks see the whole sequence)."""
    result = launch(1, 2, tmp_path / "sp.pt", mode="sequence")
    assert result["status"] == {"sequence_parallel": "applied", "sequence_parallel_ends": "applied"}
    assert_same_run(result, dp=1)


def test_without_a_mesh_every_parallel_pass_is_skipped_and_reported():
    import slapo_lightning as slapo

    model = llama()
    report = slapo.apply_schedule(model, SPEC)
    assert report.applied == []
    assert all(p.status == "skipped" for p in report.passes)
    assert "no device mesh" in report["tensor_parallel"].skipped[0].reason


@pytest.mark.timeout(600)
def test_slapo_shard_and_sync_train_like_one_process_and_refuse_what_does_not_fit(tmp_path):
    result = launch(1, 2, tmp_path / "slapo.pt", mode="slapo")
    assert_same_run(result, dp=1)
    wrong_sync, reshard, not_linear = result["errors"]
    assert "sync(mode='fwd_post') at model.layers.0.mlp.gate_proj needs a rowwise sharded Linear" in wrong_sync
    assert "model.layers.0.mlp.down_proj is already sharded rowwise" in reshard
    assert "model.layers.0.input_layernorm is a LlamaRMSNorm; shard() splits nn.Linear parameters" in not_linear


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--spec":
    worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
elif __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--sequence":
    worker(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), SEQUENCE_SPEC)
elif __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--slapo":
    slapo_style_worker(Path(sys.argv[4]))
