"""The shipped BERT and GPT-2 schedules, and the ``auto`` schedule on a Llama, under a device mesh (2 gloo processes): one file for
every strategy. Tensor parallelism and FSDP2 passes apply where the mesh has those dimensions,
the passes whose ops need whole weights are skipped there, and training equals one unscheduled
process; without a mesh the parallel passes are skipped and the rest applies as before."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
SCHEDULES = HERE.parent / "slapo_lightning" / "configs" / "schedule"
STEPS = 2
SCHEDULE_OF = {"bert": "bert", "gpt2": "gpt2"}  # every other architecture: the auto schedule


def model(name: str):
    import transformers as tf

    torch.manual_seed(0)
    if name not in ("bert", "gpt2"):
        import decoder_models

        return decoder_models.build(name, "sdpa")
    if name == "bert":
        return tf.BertForMaskedLM(tf.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=64, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0, attn_implementation="sdpa"))
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                            attn_implementation="sdpa"))


def batch(rank: int) -> dict:
    generator = torch.Generator().manual_seed(20 + rank)
    ids = torch.randint(0, 101, (2, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def train(m, batches: list[dict]) -> list[float]:
    optimizer = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(STEPS):
        loss = sum(m(**b).loss for b in batches) / len(batches)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def worker(name: str, dp: int, tp: int, out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    import slapo_lightning as slapo

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
    m = model(name)
    report = slapo.apply_schedule(m, str(SCHEDULES / f"{SCHEDULE_OF.get(name, 'auto')}.yaml"), device_mesh=mesh)
    losses = train(m, [batch(mesh["data_parallel"].get_local_rank())])
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, losses)
    state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in m.state_dict().items()}
    reloaded = reload_full_checkpoint(m, name, mesh)
    distributed = reload_distributed_checkpoint(m, name, mesh, out.parent / "dcp")
    sharded = sorted(k for k, v in m.state_dict().items() if isinstance(v, DTensor) and k.endswith("weight"))
    skipped = {s.path: s.reason for p in report.passes if p.name == "tensor_parallel" for s in p.skipped}
    if dist.get_rank() == 0:
        torch.save({"losses": gathered, "state": state, "applied": report.applied, "reloaded": reloaded,
                    "sharded": sharded, "tp_skipped": skipped, "distributed": distributed}, out)
    dist.barrier()  # no rank leaves while another still talks to it (gloo aborts)
    dist.destroy_process_group()


def reload_full_checkpoint(trained, name: str, mesh) -> float:
    """A full (gathered) checkpoint of the trained model loaded, as Lightning loads one, into a
    fresh model scheduled alike: the largest difference of their losses on a batch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    import slapo_lightning as slapo

    full = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
    checkpoint = get_model_state_dict(trained, options=full)
    fresh = model(name)
    fresh.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    slapo.apply_schedule(fresh, str(SCHEDULES / f"{SCHEDULE_OF.get(name, 'auto')}.yaml"), device_mesh=mesh)
    set_model_state_dict(fresh, checkpoint, options=full)
    with torch.no_grad():
        inputs = batch(0)
        return abs(trained(**inputs).loss.item() - fresh(**inputs).loss.item())


def reload_distributed_checkpoint(trained, name: str, mesh, path: Path) -> dict:
    """A torch.distributed.checkpoint of the trained model (each rank its shards), loaded into a
    fresh model scheduled alike, as Lightning's ModelParallelStrategy saves and resumes: its keys
    and the largest difference of the two models' losses on a batch."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import slapo_lightning as slapo

    dcp.save({"model": get_model_state_dict(trained)}, checkpoint_id=str(path))
    fresh = model(name)
    fresh.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    slapo.apply_schedule(fresh, str(SCHEDULES / f"{SCHEDULE_OF.get(name, 'auto')}.yaml"), device_mesh=mesh)
    state = {"model": get_model_state_dict(fresh)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(fresh, state["model"])
    keys = sorted(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    with torch.no_grad():
        inputs = batch(0)
        return {"keys": keys, "difference": abs(trained(**inputs).loss.item() - fresh(**inputs).loss.item())}


def launch(name: str, dp: int, tp: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(dp * tp),
                           "--standalone", __file__, name, str(dp), str(tp),
                           str(out)], capture_output=True, text=True, timeout=400, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=False)


CASES = [("bert", 1, 2), ("bert", 2, 1), ("gpt2", 1, 2), ("gpt2", 2, 1), ("llama", 1, 2), ("llama", 2, 1),
         ("gpt2", 2, 2)]
SLOW = {("gpt2", 2, 2)}  # 4 processes


def assert_trains_like_one_process(name: str, dp: int, result: dict) -> None:
    reference = model(name)
    expected = train(reference, [batch(r) for r in range(dp)])
    per_rank = torch.tensor(result["losses"]).reshape(dp, -1, STEPS)[:, 0]
    torch.testing.assert_close(per_rank.mean(0), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert result["reloaded"] < 1e-6, "a full checkpoint reloads into a freshly scheduled model"
    assert result["distributed"]["difference"] < 1e-6, "so does a distributed one"
    assert result["distributed"]["keys"] == sorted(f"model.{k}" for k in reference.state_dict()), "with the plain keys"


LEFT_WHOLE = {  # architecture -> the layer weights the megatron plan shards (the rest computes something else sharded)
    "olmo2": {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},  # q_norm/k_norm normalise all of q's features
    "phi3": set(),  # qkv_proj and gate_up_proj are split by fixed sizes
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", [pytest.param("olmo2", marks=pytest.mark.ci), "phi3"])
def test_auto_tensor_parallel_leaves_whole_what_would_compute_something_else(name, tmp_path):
    result = launch(name, 1, 2, tmp_path / "out.pt")
    assert_trains_like_one_process(name, 1, result)
    layer_weights = {k.split("layers.0.", 1)[1] for k in result["sharded"] if "layers.0." in k}
    assert layer_weights == {f"{w}.weight" for w in LEFT_WHOLE[name]}
    if not LEFT_WHOLE[name]:
        assert "computes something else on its example input" in result["tp_skipped"]["model.layers.0"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,dp,tp", [pytest.param(*c, marks=[pytest.mark.slow] if c in SLOW else [],
                                                    id=f"{c[0]}-dp{c[1]}-tp{c[2]}") for c in CASES])
def test_shipped_schedule_under_a_mesh_trains_like_one_process(name, dp, tp, tmp_path):
    result = launch(name, dp, tp, tmp_path / "out.pt")
    assert_trains_like_one_process(name, dp, result)
    if dp > 1 and tp > 1:
        assert {"tensor_parallel", "fsdp_layers", "fsdp_root"} <= set(result["applied"])
    elif tp > 1:
        assert "tensor_parallel" in result["applied"]
        assert not {"fused_qkv", "fused_mlp", "gated_mlp"} & set(result["applied"]), "ops needing whole weights are skipped"
        assert "flash_attention" in result["applied"], "attention on local heads"
        if name == "llama":  # the megatron plan read off the dataflow: every projection sharded
            assert {k.split("layers.0.", 1)[1] for k in result["sharded"] if "layers.0." in k} == {
                f"{p}.weight" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    else:  # under FSDP2 the fused ops run on the gathered weights; checkpoints keep the plain keys
        assert {"fsdp_layers", "fsdp_root"} <= set(result["applied"])
        fused = {"bert": {"fused_qkv", "bias_dropout_add_layer_norm", "bias_gelu"}, "gpt2": {"fused_mlp"},
                 "llama": {"rms_norm", "fused_qkv", "gated_mlp"}}[name]
        assert fused <= set(result["applied"]), result["applied"]


@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_without_a_mesh_the_shipped_parallel_passes_are_skipped(name):
    import slapo_lightning as slapo

    report = slapo.apply_schedule(model(name), str(SCHEDULES / f"{SCHEDULE_OF.get(name, 'auto')}.yaml"))
    parallel = [p for p in report.passes if p.name in ("tensor_parallel", "fsdp_layers", "fsdp_root")]
    assert parallel and all(p.status == "skipped" and "no device mesh" in p.skipped[0].reason for p in parallel)
    assert "flash_attention" in report.applied


if __name__ == "__main__" and len(sys.argv) == 5:
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
