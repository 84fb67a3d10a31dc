"""Peak training memory at equal batch: Hugging Face sdpa vs the shipped schedule (fused
linear+cross-entropy) vs the schedule with activation checkpointing on, and what it costs in
tokens/s; optionally the largest batch under a memory cap.

Usage: ``python benchmarks/memory.py [--quick] [--preset quick|cpu|gpu] [--recipes gpt2 bert]
[--batch N] [--cap-mib MiB]``

Peak memory is one training step's (forward, loss, backward, AdamW step) measured in a fresh
process per variant after warm-up (CPU: peak RSS from a reset high-water mark; CUDA:
``max_memory_allocated``; see ``common.py``). ``total`` counts everything the model needs
(weights, gradients, AdamW state, activations, workspaces); ``step`` only what the step adds on
top of weights and optimizer state. Tokens/s: median of steps taken in one process, the variants
alternating round by round. With ``--cap-mib`` the largest batch under the cap is estimated from
a straight line through the peaks at ``batch`` and ``2 * batch`` (activations grow linearly
with the batch) and then measured.

Writes ``benchmarks/results/memory_<preset>.{md,csv,json,png}``.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PRESETS, VARIANTS, Workload, add_common_arguments, build_trainee, configure_allocator, figure_per_recipe, fmt, log, machine_info,
    markdown_table, median, other_busy_processes, peak_in_fresh_process, settle_common_arguments, timed_rounds,
    warm_up, write_csv, write_json,
)

MEMORY_VARIANTS = ["sdpa", "schedule", "schedule_checkpoint"]
BASELINE = "sdpa"
MEMORY_TARGET = 0.5
COST_TARGET = 0.10
DEFAULT_ROUNDS = 5
TARGET_RECIPES = ("gpt2",)


def throughput(workload: Workload, device: str, warmup: int, rounds: int) -> dict[str, float]:
    """Tokens/s per variant, variants alternating in one process."""
    trainees = [build_trainee(workload, VARIANTS[name], device) for name in MEMORY_VARIANTS]
    warm_up(trainees, warmup)
    timed_rounds(trainees, rounds, log)
    result = {t.variant.name: workload.tokens / median(t.step_times) for t in trainees}
    del trainees
    gc.collect()
    return result


def largest_batch(workload: Workload, variant: str, device: str, cap_mib: float, at_batch: dict) -> dict:
    """Largest batch whose total peak stays under ``cap_mib``: a line through the peaks at batch b
    and 2b gives the estimate, a measurement at the estimate checks it (one batch lower if over)."""
    doubled = peak_in_fresh_process(workload.with_batch(2 * workload.batch), variant, device)["total_mib"]
    per_sample = (doubled - at_batch["total_mib"]) / workload.batch
    fixed = at_batch["total_mib"] - per_sample * workload.batch
    estimate = max(1, int((cap_mib - fixed) // per_sample))
    for batch in (estimate, estimate - 1):
        if batch < 1:
            break
        peak = peak_in_fresh_process(workload.with_batch(batch), variant, device)["total_mib"]
        log(f"  {variant}: batch {batch} -> {peak:.0f} MiB (cap {cap_mib:.0f})")
        if peak <= cap_mib:
            return {"max_batch": batch, "max_batch_peak_mib": peak, "mib_per_sample": per_sample}
    return {"max_batch": None, "max_batch_peak_mib": None, "mib_per_sample": per_sample}


def run_recipe(workload: Workload, args: argparse.Namespace) -> list[dict]:
    log(f"{workload.recipe}: {workload.describe()}")
    tokens_per_s = throughput(workload, args.device, args.warmup, args.rounds)
    rows = []
    for name in MEMORY_VARIANTS:
        peak = peak_in_fresh_process(workload, name, args.device, args.warmup)
        log(f"  {name}: total {peak['total_mib']:.0f} MiB, step {peak['step_mib']:.0f} MiB")
        row = {"recipe": workload.recipe, "variant": name, "label": VARIANTS[name].label,
               "model": workload.describe(), "batch": workload.batch, "tokens_per_s": round(tokens_per_s[name], 2),
               **{k: round(v, 1) for k, v in peak.items()}}
        if args.cap_mib:
            row.update(largest_batch(workload, name, args.device, args.cap_mib, peak))
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["memory_vs_sdpa"] = round(row["total_mib"] / base["total_mib"], 3)
        row["step_memory_vs_sdpa"] = round(row["step_mib"] / base["step_mib"], 3)
        row["tokens_per_s_vs_sdpa"] = round(row["tokens_per_s"] / base["tokens_per_s"], 3)
    return rows


def table(rows: list[dict], cap_mib: float | None) -> str:
    columns = ["recipe", "variant", "batch", "peak MiB (total)", "vs sdpa", "peak MiB (step)", "vs sdpa",
               "tokens/s", "vs sdpa"]
    if cap_mib:
        columns += [f"largest batch under {cap_mib:.0f} MiB", "MiB per sample"]
    body = []
    for r in rows:
        line = [r["recipe"], r["label"], str(r["batch"]), fmt(r["total_mib"], 0), f"{r['memory_vs_sdpa']:.2f}x",
                fmt(r["step_mib"], 0), f"{r['step_memory_vs_sdpa']:.2f}x", fmt(r["tokens_per_s"]),
                f"{r['tokens_per_s_vs_sdpa']:.2f}x"]
        if cap_mib:
            line += [str(r["max_batch"]), fmt(r["mib_per_sample"], 0)]
        body.append(line)
    return markdown_table(columns, body, right_from=2)


def targets_text(rows: list[dict]) -> str:
    """The issue's memory target is the GPT recipe's; other recipes get the same numbers, no verdict."""
    lines = []
    for r in rows:
        if r["variant"] != "schedule_checkpoint":
            continue
        no_ckpt = next(x for x in rows if x["recipe"] == r["recipe"] and x["variant"] == "schedule")
        cost = 1 - r["tokens_per_s_vs_sdpa"]
        cost_vs_schedule = 1 - r["tokens_per_s"] / no_ckpt["tokens_per_s"]
        cost_text = f"a cost of {cost:.0%}" if cost > 0 else "no cost"
        memory = f"peak {r['memory_vs_sdpa']:.2f}x HF sdpa"
        speed = f"tokens/s {r['tokens_per_s_vs_sdpa']:.2f}x HF sdpa, {cost_text}"
        if r["recipe"] in TARGET_RECIPES:
            memory += f" (target <= {MEMORY_TARGET}x): {'met' if r['memory_vs_sdpa'] <= MEMORY_TARGET else 'missed'}"
            speed += f" (target <= {COST_TARGET:.0%}): {'met' if cost <= COST_TARGET else 'missed'}"
        else:
            speed += " (no target for this recipe)"
        lines.append(f"- {r['recipe']} schedule (fused linear+CE) + checkpointing: {memory}; {speed}; "
                     f"checkpointing itself costs {cost_vs_schedule:.0%} of the schedule's tokens/s without it")
    return "\n".join(lines) + "\n"


def bar_chart(path: Path, rows: list[dict], title: str) -> None:
    with figure_per_recipe(path, rows, title, panels=1, size=(5.5, 4)) as columns:
        for recipe, mine, (ax,) in columns:
            x = range(len(mine))
            resident = [r["total_mib"] - r["step_mib"] for r in mine]
            ax.bar(x, resident, color="#bbb", label="weights + AdamW state")
            ax.bar(x, [r["step_mib"] for r in mine], bottom=resident, color="#d84", label="step (activations, grads)")
            for i, r in enumerate(mine):
                ax.annotate(f"{r['memory_vs_sdpa']:.2f}x mem\n{r['tokens_per_s_vs_sdpa']:.2f}x tok/s",
                            (i, r["total_mib"]), ha="center", va="bottom", fontsize=8)
            ax.set_xticks(list(x), [r["label"].replace(" + ", "\n+ ").replace(" (", "\n(") for r in mine], fontsize=8)
            ax.set_ylim(top=1.18 * max(r["total_mib"] for r in mine))
            ax.set_ylabel("peak MiB")
            ax.set_title(f"{recipe}: {mine[0]['model']}", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULT_ROUNDS)
    parser.add_argument("--cap-mib", type=float, help="also find the largest batch whose total peak fits this cap")
    args = parser.parse_args(argv)
    settle_common_arguments(parser, args, DEFAULT_ROUNDS)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine_info(args.device)
    info["allocator"] = configure_allocator(args.device, args.allocator)
    rows = []
    for recipe in args.recipes:
        workload: Workload = PRESETS[args.preset][recipe]
        rows += run_recipe(workload.with_batch(args.batch) if args.batch else workload, args)
    info.update(loadavg_end=os.getloadavg(), other_processes_end=other_busy_processes(),
                wall_s=round(time.perf_counter() - started))
    dtype = "bf16 autocast" if args.device == "cuda" else "fp32"
    header = (f"Peak training memory at equal batch ({args.preset} preset, {dtype}), {info.get('gpu', info['cpu'])}, "
              f"{info['threads']} threads, allocator: {info['allocator']}, torch {info['torch']}, "
              f"transformers {info['transformers']}; load average "
              f"start {tuple(round(x, 2) for x in info['loadavg_start'])}, end "
              f"{tuple(round(x, 2) for x in info['loadavg_end'])}; tokens/s: median of {args.rounds} steps")
    text = f"{header}\n\n{table(rows, args.cap_mib)}\n{targets_text(rows)}"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory_{args.preset}{args.tag}"
    stem.with_suffix(".md").write_text(text)
    write_csv(stem.with_suffix(".csv"), rows)
    write_json(stem.with_suffix(".json"), {"machine": info, "args": vars(args), "rows": rows})
    bar_chart(stem.with_suffix(".png"), rows, header[:180])
    return stem


if __name__ == "__main__":
    main()
