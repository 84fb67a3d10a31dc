"""Time and peak memory of each op in ``slapo_lightning.op`` against the code it replaces.

Usage: ``python benchmarks/ops.py [--quick] [--device cpu|cuda] [--only NAME ...]``

Every case runs one training step of the op (forward + backward from fixed random upstream
gradients, parameter gradients included) and of its reference (the plain PyTorch / transformers code a schedule swaps out), on the same
inputs and weights.

* Time: best wall time of the step over several runs after one warm-up run, op and reference
  interleaved run by run in one process (CUDA: synchronised; CPU: freed memory kept for reuse,
  as the recipes' ``CPUAllocatorCallback`` does). The best rather than the median,
  because load from other processes on a shared machine only ever makes a run slower.
* Peak memory on CPU: every (case, variant) runs in a fresh Python process. After setup and one
  warm-up step the process resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``),
  runs one step and reports ``VmHWM - VmRSS_before``: the extra resident memory the step needed at
  its peak, all allocations included (tensors, autograd state, oneDNN/BLAS workspaces). A fresh
  process per variant keeps one variant's freed-but-cached memory out of the other's number, and
  glibc is told to return every block over 128 KiB to the system when it is freed (see
  ``MALLOC_ENV``), so memory freed by the warm-up is not silently reused. Linux-only; elsewhere
  the column says n/a.
* Peak memory on CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the allocation
  before it.

Results go to ``benchmarks/results/ops_<device>.md`` (the markdown table printed) and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slapo_lightning.op import (  # noqa: E402
    FastDropout,
    FlashAttentionOp,
    FusedBiasDropoutAddLayerNorm,
    FusedBiasGELU,
    FusedMLP,
    FusedQKV,
    fused_linear_cross_entropy,
)
from slapo_lightning.lightning.cpu_allocator import retain_freed_memory  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
Step = Callable[[], None]


def _params_require_grad(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in tensors]


def _step(forward: Callable[[], torch.Tensor | tuple], leaves: list[torch.Tensor]) -> Step:
    """One training step: forward, backward from fixed random upstream gradients (materialised, as
    in a real model; a scalar output gets 1), then drop the gradients."""
    upstream: list[torch.Tensor] = []

    def run() -> None:
        out = forward()
        outs = list(out) if isinstance(out, tuple) else [out]
        if not upstream:
            upstream.extend(torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs)
        torch.autograd.backward(outs, upstream)
        for leaf in leaves:
            leaf.grad = None

    return run


def attention_case(size: dict, device: str) -> dict[str, Step]:
    """BERT/GPT-2 core attention: the eager softmax(QK^T/sqrt(d) + mask)V vs FlashAttentionOp('auto')."""
    b, h, s, d, causal = size["batch"], size["heads"], size["seq"], size["head_dim"], size["causal"]
    q, k, v = _params_require_grad(*(torch.randn(b, h, s, d, device=device) for _ in range(3)))
    keep = torch.ones(b, 1, 1, s, dtype=torch.bool, device=device)
    keep[b // 2:, ..., -s // 4:] = False
    mask = None if causal else torch.zeros(keep.shape, device=device).masked_fill(~keep, torch.finfo(torch.float32).min)
    future = torch.ones(s, s, dtype=torch.bool, device=device).triu(1)
    op = FlashAttentionOp("auto", apply_causal_mask=causal)

    def reference():
        scores = q @ k.transpose(-1, -2) / d**0.5
        scores = scores.masked_fill(future, torch.finfo(scores.dtype).min) if causal else scores + mask
        return torch.softmax(scores, dim=-1) @ v

    return {"reference": _step(reference, [q, k, v]), "op": _step(lambda: op(q, k, v, mask), [q, k, v])}


def qkv_case(size: dict, device: str) -> dict[str, Step]:
    """Three nn.Linear projections vs FusedQKV (one GEMM)."""
    hidden, tokens = size["hidden"], size["tokens"]
    linears = [nn.Linear(hidden, hidden, device=device) for _ in range(3)]
    fused = FusedQKV.from_linears(*linears, n_heads=12)
    x = torch.randn(tokens // 128, 128, hidden, device=device, requires_grad=True)
    ref_leaves = [x, *(p for lin in linears for p in lin.parameters())]
    return {
        "reference": _step(lambda: tuple(lin(x) for lin in linears), ref_leaves),
        "op": _step(lambda: fused(x), [x, *fused.parameters()]),
    }


def bias_gelu_case(size: dict, device: str) -> dict[str, Step]:
    """gelu(x + bias) (BERT intermediate after decompose) vs FusedBiasGELU."""
    x = torch.randn(size["tokens"], size["features"], device=device, requires_grad=True)
    bias = torch.randn(size["features"], device=device, requires_grad=True)
    op = FusedBiasGELU("none")
    return {
        "reference": _step(lambda: F.gelu(x + bias), [x, bias]),
        "op": _step(lambda: op(x, bias), [x, bias]),
    }


def dropout_case(size: dict, device: str) -> dict[str, Step]:
    """nn.Dropout (the residual and embedding dropouts of GPT-2 and BERT) vs FastDropout."""
    x = torch.randn(size["batch"], size["seq"], size["hidden"], device=device, requires_grad=True)
    reference, op = nn.Dropout(0.1), FastDropout(0.1)
    return {"reference": _step(lambda: reference(x), [x]), "op": _step(lambda: op(x), [x])}


def layer_norm_case(size: dict, device: str) -> dict[str, Step]:
    """LayerNorm(dropout(x + bias) + residual) (BERT output tail) vs FusedBiasDropoutAddLayerNorm."""
    tokens, hidden = size["tokens"], size["hidden"]
    x, residual = (torch.randn(tokens, hidden, device=device, requires_grad=True) for _ in range(2))
    bias = torch.randn(hidden, device=device, requires_grad=True)
    ln, dropout = nn.LayerNorm(hidden, eps=1e-12, device=device), nn.Dropout(0.1)
    op = FusedBiasDropoutAddLayerNorm.from_layer_norm(ln, p=0.1)
    leaves = [x, residual, bias, *ln.parameters()]
    return {
        "reference": _step(lambda: ln(dropout(x + bias) + residual), leaves),
        "op": _step(lambda: op(x, bias, residual), leaves),
    }


def mlp_case(size: dict, device: str) -> dict[str, Step]:
    """transformers' GPT2MLP (Conv1D -> gelu_new -> Conv1D -> dropout) vs FusedMLP.from_gpt2."""
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    hidden, tokens = size["hidden"], size["tokens"]
    block = GPT2MLP(4 * hidden, GPT2Config(n_embd=hidden, n_head=12)).to(device)
    fused = FusedMLP.from_gpt2(block)
    x = torch.randn(tokens // 128, 128, hidden, device=device, requires_grad=True)
    leaves = [x, *block.parameters()]
    return {"reference": _step(lambda: block(x), leaves), "op": _step(lambda: fused(x), leaves)}


def cross_entropy_case(size: dict, device: str) -> dict[str, Step]:
    """F.cross_entropy(F.linear(h, W), y) (GPT-2 LM head) vs fused_linear_cross_entropy."""
    tokens, hidden, vocab = size["tokens"], size["hidden"], size["vocab"]
    h = torch.randn(tokens, hidden, device=device, requires_grad=True)
    weight = (0.02 * torch.randn(vocab, hidden, device=device)).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device=device)
    labels[::10] = -100

    def reference():
        return F.cross_entropy(F.linear(h, weight), labels)

    return {
        "reference": _step(reference, [h, weight]),
        "op": _step(lambda: fused_linear_cross_entropy(h, weight, labels), [h, weight]),
    }


CASES: dict[str, tuple[Callable[[dict, str], dict[str, Step]], dict[str, list[dict]]]] = {
    "flash_attention": (attention_case, {
        "quick": [dict(batch=4, heads=12, seq=128, head_dim=64, causal=False)],
        "full": [dict(batch=8, heads=12, seq=256, head_dim=64, causal=False),
                 dict(batch=8, heads=12, seq=256, head_dim=64, causal=True)],
    }),
    "fused_qkv": (qkv_case, {
        "quick": [dict(tokens=1024, hidden=768)],
        "full": [dict(tokens=2048, hidden=768)],
    }),
    "fused_bias_gelu": (bias_gelu_case, {
        "quick": [dict(tokens=1024, features=3072)],
        "full": [dict(tokens=2048, features=3072)],
    }),
    "fast_dropout": (dropout_case, {
        "quick": [dict(batch=2, seq=512, hidden=512)],
        "full": [dict(batch=2, seq=1024, hidden=512)],
    }),
    "fused_bias_dropout_add_layer_norm": (layer_norm_case, {
        "quick": [dict(tokens=1024, hidden=768)],
        "full": [dict(tokens=4096, hidden=768)],
    }),
    "fused_mlp": (mlp_case, {
        "quick": [dict(tokens=1024, hidden=768)],
        "full": [dict(tokens=2048, hidden=768)],
    }),
    "fused_linear_cross_entropy": (cross_entropy_case, {
        "quick": [dict(tokens=2048, hidden=768, vocab=50257)],
        "full": [dict(tokens=8192, hidden=768, vocab=50257)],
    }),
}


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _cpu_peak_mib(step: Step) -> float | None:
    """Extra resident memory at the peak of one step (Linux); None where it cannot be measured."""
    try:
        before = _proc_status_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        step()
        return None
    step()
    return max(0, _proc_status_kib("VmHWM") - before) / 1024


def _cuda_peak_mib(step: Step) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _best_ms(steps: dict[str, Step], device: str, max_rounds: int, budget_s: float) -> dict[str, float]:
    """Best-of-N wall time per variant, variants interleaved round by round so that load from
    other processes hits both alike (such load only ever slows a run down, hence the minimum)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    started = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < 1 or time.perf_counter() - started < budget_s):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: min(ts) for name, ts in times.items()}


def measure_peak(case: str, size: dict, variant: str, device: str) -> float | None:
    """Peak extra memory (MiB) of one step of one variant, after a warm-up step, in this process."""
    torch.manual_seed(0)
    step = CASES[case][0](size, device)[variant]
    step()
    return _cuda_peak_mib(step) if device == "cuda" else _cpu_peak_mib(step)


def measure_times(case: str, size: dict, device: str, max_rounds: int, budget_s: float) -> dict[str, float]:
    """Best time (ms) of one step of each variant, after a warm-up step each, in this process; on
    CPU with freed memory kept for reuse, as the recipes run (else every step's page faults,
    not the op, would be timed)."""
    if device == "cpu":
        retain_freed_memory()
    torch.manual_seed(0)
    steps = CASES[case][0](size, device)
    for step in steps.values():
        step()
    return _best_ms(steps, device, max_rounds, budget_s)


WORKERS = {"peak": measure_peak, "times": measure_times}

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""glibc otherwise raises its mmap threshold (up to 32 MiB) after the warm-up frees, and keeps the
freed blocks resident: the measured step would then reuse them unseen. A fixed threshold makes
every block over 128 KiB its own mapping, returned to the system when freed."""


def _in_fresh_process(kind: str, **job):
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(dict(kind=kind, **job))],
        capture_output=True, text=True, env={**os.environ, **MALLOC_ENV},
    )
    if done.returncode:
        raise RuntimeError(f"benchmark worker {kind} {job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_case(case: str, size: dict, device: str, max_rounds: int, budget_s: float) -> dict:
    """{"reference": {"ms", "peak_mib"}, "op": {...}}. On CPU each measurement runs in a fresh
    process, so that peak RSS belongs to one variant alone."""
    if device == "cuda":
        times = measure_times(case, size, device, max_rounds, budget_s)
        peaks = {variant: measure_peak(case, size, variant, device) for variant in times}
    else:
        times = _in_fresh_process("times", case=case, size=size, device=device, max_rounds=max_rounds, budget_s=budget_s)
        peaks = {variant: _in_fresh_process("peak", case=case, size=size, variant=variant, device=device) for variant in times}
    return {variant: {"ms": times[variant], "peak_mib": peaks[variant]} for variant in ("reference", "op")}


def _size_label(size: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in size.items())


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator <= 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


def markdown(rows: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| op | size | reference ms | op ms | speedup | reference peak MiB | op peak MiB | memory ratio (ref/op) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ref, op = row["reference"], row["op"]
        lines.append(
            f"| {row['case']} | {_size_label(row['size'])} | {_fmt(ref['ms'])} | {_fmt(op['ms'])} | "
            f"{_ratio(ref['ms'], op['ms'])} | {_fmt(ref['peak_mib'])} | {_fmt(op['peak_mib'])} | "
            f"{_ratio(ref['peak_mib'], op['peak_mib'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer runs (about 3 minutes on 2 shared cores; the default run takes 6-9)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="run only these ops (prints, saves nothing)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        job = json.loads(args.worker)
        print(json.dumps(WORKERS[job.pop("kind")](**job)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU")
    scale = "quick" if args.quick else "full"
    max_rounds, budget_s = (3, 2.0) if args.quick else (5, 20.0)
    rows = []
    for case in args.only or CASES:
        for size in CASES[case][1][scale]:
            row = {"case": case, "size": size, **run_case(case, size, args.device, max_rounds, budget_s)}
            rows.append(row)
            print(f"{case} [{_size_label(size)}]: reference {row['reference']}, op {row['op']}", file=sys.stderr)
    machine = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = (
        f"Ops vs reference, one training step (forward + backward), float32, {args.device} ({machine}), "
        f"torch {torch.__version__}, {scale} sizes"
    )
    table = markdown(rows, header)
    print(table)
    if args.only:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"ops_{args.device}" + ("_quick" if args.quick else "")
    (RESULTS / f"{stem}.md").write_text(table)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
