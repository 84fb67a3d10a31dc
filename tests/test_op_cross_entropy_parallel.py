"""The fused linear+cross-entropy under tensor parallelism (2 gloo processes): given a
vocabulary-parallel head (its weight a DTensor sharded by rows, as a colwise lm_head leaves it)
it computes the loss and gradients of the whole head, each rank getting its shard's gradient."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN = 12, 8


def inputs():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator)
    bias = torch.randn(VOCAB, generator=generator)
    labels = torch.randint(0, VOCAB, (2, 5), generator=generator)
    labels[1, 3:] = -100
    return hidden, weight, bias, labels


def worker(out: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from slapo_lightning.op import fused_linear_cross_entropy

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",))
    hidden, weight, bias, labels = inputs()
    hidden.requires_grad_()
    weight = torch.nn.Parameter(distribute_tensor(weight, mesh, [Shard(0)]))
    bias = torch.nn.Parameter(distribute_tensor(bias, mesh, [Shard(0)]))
    loss = fused_linear_cross_entropy(hidden, weight, labels, bias, chunk_size=3)
    loss.backward()
    result = {"loss": loss.item(), "hidden": hidden.grad, "weight": weight.grad.full_tensor(),
              "bias": bias.grad.full_tensor(), "local_rows": weight.grad.to_local().shape[0]}
    if dist.get_rank() == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_a_vocabulary_parallel_head_gives_the_whole_heads_loss_and_gradients(tmp_path):
    out = tmp_path / "out.pt"
    env = {**os.environ, "PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           __file__, str(out)], capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    hidden, weight, bias, labels = inputs()
    for t in (hidden, weight, bias):
        t.requires_grad_()
    logits = torch.nn.functional.linear(hidden, weight, bias).reshape(-1, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits, labels.reshape(-1), ignore_index=-100)
    loss.backward()
    assert abs(result["loss"] - loss.item()) < 1e-6
    torch.testing.assert_close(result["hidden"], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["weight"], weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result["bias"], bias.grad, rtol=1e-5, atol=1e-6)
    assert result["local_rows"] == VOCAB // 2, "each rank keeps only its shard's gradient"


if __name__ == "__main__" and len(sys.argv) == 2:
    worker(Path(sys.argv[1]))
