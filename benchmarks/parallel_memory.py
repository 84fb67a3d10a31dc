"""Per-rank training state under a schedule's parallel passes: parameter, gradient and AdamW
state bytes of one rank under FSDP2 and tensor parallelism, against one process holding it all,
and tokens/s of a training step on each layout.

Usage: ``python benchmarks/parallel_memory.py [--quick] [--ranks 2] [--device cpu|cuda]``

On CPU the ranks are gloo processes on this machine (the bytes are exact; tokens/s only shows
that the step runs, the cores being shared). With ``--device cuda`` (one GPU per rank, NCCL,
bf16 autocast) the same script measures the scaling. The model is a Llama (the ``large`` preset
is 1B-class for GPUs); the layout comes from a spec with tensor-parallel and FSDP2 passes, the
device mesh from the launcher, as under Lightning's ModelParallelStrategy.

Writes ``benchmarks/results/parallel_memory_<preset>.{md,json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, fmt, log, machine_info, markdown_table, write_json  # noqa: E402

PRESETS = {
    "quick": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024, seq=32, batch=2),
    "cpu": dict(hidden=512, layers=4, heads=8, kv_heads=2, intermediate=1408, vocab=32000, seq=256, batch=2),
    "large": dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632, vocab=32000, seq=1024, batch=4),
}
PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
        "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
        "mlp.down_proj": "rowwise"}
SPEC = {"passes": {
    "tensor_parallel": {"select": "model.layers.*", "steps": [{"parallelize": {"plan": PLAN}}]},
    "tensor_parallel_vocab": {"steps": [{"parallelize": {"plan": {"model.embed_tokens": "vocab_embedding",
                                                                  "lm_head": "colwise_gathered"}}}]},
    "fsdp_layers": {"select": "model.layers.*", "steps": [{"fully_shard": {}}]},
    "fsdp_root": {"steps": [{"fully_shard": {}}]},
}}
LAYOUTS = {"one process": (1, 1), "FSDP": ("n", 1), "TP": (1, "n")}


def local_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def build(preset: dict):
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=preset["vocab"], hidden_size=preset["hidden"], num_hidden_layers=preset["layers"],
        num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
        intermediate_size=preset["intermediate"], max_position_embeddings=preset["seq"],
        attn_implementation="sdpa"))


def worker(preset_name: str, dp: int, tp: int, device: str, steps: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import slapo_lightning as slapo

    preset = PRESETS[preset_name]
    distributed = dp * tp > 1
    mesh = None
    if distributed:
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        mesh = init_device_mesh(device, (dp, tp), mesh_dim_names=("data_parallel", "tensor_parallel"))
    model = build(preset).to(device)
    report = slapo.apply_schedule(model, SPEC, device_mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, preset["vocab"], (preset["batch"], preset["seq"]), generator=generator).to(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = local_bytes(p.grad for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    params = local_bytes(model.parameters())
    state = local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    result = {"params": params, "grads": grads, "optimizer": state, "step_s": sorted(times)[len(times) // 2],
              "tokens": ids.numel(), "applied": report.applied}
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        rank = dist.get_rank()
        dist.barrier()  # no rank leaves while another still talks to it (gloo aborts)
        dist.destroy_process_group()
        return gathered if rank == 0 else None
    return [result]


def run(preset: str, dp: int, tp: int, device: str, steps: int) -> list[dict]:
    job = [preset, dp, tp, device, steps]
    ranks = dp * tp
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    if ranks > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--standalone"] + command[1:]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(f"dp={dp} tp={tp} failed:\n{done.stderr[-4000:]}")
    out = [line for line in done.stdout.splitlines() if line.startswith("[")]
    return json.loads(out[0])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else args.preset or ("large" if args.device == "cuda" else "cpu")
    rows, results = [], {}
    for layout, (dp, tp) in LAYOUTS.items():
        dp, tp = (args.ranks if dp == "n" else dp), (args.ranks if tp == "n" else tp)
        log(f"parallel memory {preset}: {layout} (dp={dp}, tp={tp})")
        ranks = run(preset, dp, tp, args.device, args.steps)
        results[layout] = ranks
    base = results["one process"][0]
    for layout, ranks in results.items():
        r = ranks[0]
        total, base_total = r["params"] + r["grads"] + r["optimizer"], base["params"] + base["grads"] + base["optimizer"]
        rows.append([layout, str(len(ranks)), fmt(r["params"] / 2**20, 1), fmt(r["grads"] / 2**20, 1),
                     fmt(r["optimizer"] / 2**20, 1), fmt(total / base_total, 2, "x"),
                     fmt(r["tokens"] * (len(ranks) // (1 if layout != "TP" else len(ranks))) / r["step_s"], 0),
                     ", ".join(r["applied"]) or "-"])
    table = markdown_table(["layout", "ranks", "params MiB/rank", "grads MiB/rank", "AdamW MiB/rank",
                            "state vs one process", "tokens/s", "passes applied"], rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"parallel_memory_{preset}.json", {"machine": machine_info(args.device), "preset": preset,
                                                             "results": results})
    path = args.out / f"parallel_memory_{preset}.md"
    path.write_text(f"# Per-rank training state under the parallel passes ({preset}, {args.device})\n\n{table}\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        gathered = worker(*json.loads(sys.argv[2]))
        if gathered is not None:
            print(json.dumps(gathered), flush=True)
    else:
        main()
