"""Training throughput of the BERT and GPT recipes' models: Hugging Face vs torch.compile vs the
shipped schedules, one process, variants alternating round by round.

Usage: ``python benchmarks/train_throughput.py [--quick] [--preset quick|cpu|gpu] [--recipes gpt2 bert]
[--variants ...] [--profile]``

What is timed is the LightningModule's training step without Lightning's loop: ``module.loss``
(forward + loss), backward, the recipe's AdamW step and LR-scheduler step, ``zero_grad``. Variants:

1. ``eager``: HF ``attn_implementation="eager"``
2. ``sdpa``: HF ``sdpa``, the default and the baseline every ratio is taken against
3. ``compile``: ``torch.compile`` of (2)'s loss (the whole forward, backward through AOTAutograd)
4. ``schedule``: ``apply_schedule(module.model, "<recipe>")`` on (2)
5. ``schedule_regional``: (4), then ``block.compile()`` of every transformer block

Per variant: tokens/s from the median of the timed steps (after warm-up, rounds rotated so drift
hits every variant alike), model FLOP/s and MFU against the fp32 (CUDA: bf16) matmul peak measured
in the same run, apply_schedule wall time, compile time (first step minus the median step), and
peak memory measured in a fresh process per variant (see ``common.py``). Also the wall time of
applying the shipped BERT schedule to a 24-layer BERT-large. ``--profile`` adds a torch.profiler
breakdown of one step per variant (share of time in GEMMs and their FLOP/s).

Writes ``benchmarks/results/train_throughput_<preset>.{md,csv,json,png}``.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PRESETS, VARIANTS, Trainee, Workload, add_common_arguments, build_trainee, configure_allocator, eval_loss,
    figure_per_recipe, flops_per_token, fmt, head_fraction, log, machine_info, markdown_table, matmul_peak_flops,
    median, other_busy_processes, peak_in_fresh_process, settle_common_arguments, timed_rounds, train_step, warm_up,
    write_csv, write_json,
)

THROUGHPUT_VARIANTS = ["eager", "sdpa", "compile", "schedule", "schedule_regional"]
ABLATIONS = ["schedule_sdpa_attention", "schedule_unfused_ce"]
"""``--ablations``: the shipped schedule with one op taken back, to show what each op adds."""
QUICK_VARIANTS = ["eager", "sdpa", "schedule"]
"""``--quick`` leaves the compiled variants out unless named: compiling takes minutes on a CPU."""
BASELINE = "sdpa"
TARGETS = {"gpt2": 1.15, "bert": 1.05, "llama": 1.3}
MFU_TARGET = 0.85
APPLY_TARGET_S = 2.0
DEFAULT_ROUNDS = 7


# -- one recipe -----------------------------------------------------------------------------------

def check_same_model(trainees: list[Trainee]) -> dict[str, float]:
    """Eval-mode loss of every uncompiled variant (compiled ones run the same code as their source):
    a broken schedule would show here before it shows as a fast, wrong number."""
    return {t.variant.name: eval_loss(t) for t in trainees if t.variant.compile is None}


def run_recipe(workload: Workload, variants: list[str], device: str, warmup: int, rounds: int) -> dict:
    log(f"{workload.recipe}: {workload.describe()}")
    trainees = []
    for name in variants:
        trainees.append(build_trainee(workload, VARIANTS[name], device))
        log(f"  built {name}" + (f" (apply_schedule {trainees[-1].apply_s:.2f}s)" if trainees[-1].apply_s else ""))
    losses = check_same_model(trainees)
    log("  eval losses: " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()))
    first = warm_up(trainees, warmup)
    log("  first steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in first.items()))
    timed_rounds(trainees, rounds, log)
    flops = flops_per_token(workload, trainees[0].module, head_fraction(workload, trainees[0].batch))
    rows = {}
    for t in trainees:
        step_s = median(t.step_times)
        rows[t.variant.name] = {
            "label": t.variant.label, "step_s": step_s, "step_times_s": t.step_times,
            "tokens_per_s": workload.tokens / step_s, "apply_s": t.apply_s,
            "first_step_s": first[t.variant.name],
            "compile_s": first[t.variant.name] - step_s if t.variant.compile else None,
            "eval_loss": losses.get(t.variant.name), "disturbed_steps": t.disturbed,
        }
    return {"workload": workload, "flops_per_token": flops, "variants": rows}


def add_memory(result: dict, device: str, warmup: int) -> None:
    for name, row in result["variants"].items():
        row.update(peak_in_fresh_process(result["workload"], name, device, warmup))
        log(f"  peak memory {name}: total {row['total_mib']:.0f} MiB, step {row['step_mib']:.0f} MiB")


GEMM_OPERANDS = {"aten::mm": 0, "aten::addmm": 1, "aten::addmm_": 1, "aten::bmm": 0, "aten::baddbmm": 1,
                 "aten::addbmm": 1}
"""Index of each GEMM's first matrix operand among its recorded input shapes (the bias-adding forms
take the addend first)."""


def gemm_flops(name: str, shapes: list) -> int:
    """FLOPs of one GEMM call from its recorded input shapes (torch's own counter skips addmm_):
    2 * batch * m * k * n, batch 1 for the 2-D forms."""
    first = GEMM_OPERANDS[name]
    *batch, m, k = shapes[first]
    n = shapes[first + 1][-1]
    return 2 * math.prod(batch) * m * k * n


def profile_recipe(workload: Workload, variants: list[str], device: str, warmup: int) -> dict[str, dict]:
    """Where one step's time goes, per variant: the GEMMs' share of the profiled time and their
    own FLOP/s (from their recorded shapes), and the costliest other ops."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    attr = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    breakdown = {}
    for name in variants:
        trainee = build_trainee(workload, VARIANTS[name], device)
        warm_up([trainee], warmup)
        with profile(activities=activities, record_shapes=True) as prof:
            wall = train_step(trainee)
        by_shape = prof.key_averages(group_by_input_shape=True)
        total_s = sum(getattr(e, attr) for e in by_shape) / 1e6
        gemms = [e for e in by_shape if e.key in GEMM_OPERANDS]
        gemm_s = sum(getattr(e, attr) for e in gemms) / 1e6
        flops = sum(gemm_flops(e.key, e.input_shapes) * e.count for e in gemms)
        top = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
        breakdown[name] = {
            "wall_s": wall, "profiled_s": total_s, "gemm_s": gemm_s, "gemm_share": gemm_s / total_s,
            "gemm_flops": flops, "gemm_flops_per_s": flops / gemm_s if gemm_s else None,
            "top_ops": [(e.key, getattr(e, attr) / 1e6, e.count) for e in top[:15]],
        }
        log(f"  profile {name}: GEMM {gemm_s:.2f}s of {total_s:.2f}s, {flops / 1e9:.0f} GFLOP")
        del trainee
        gc.collect()
    return breakdown


# -- BERT-large schedule application --------------------------------------------------------------

def bert_large_apply_seconds(repeats: int = 3) -> dict:
    """Wall time of ``apply_schedule(BertForMaskedLM(bert-large), bert.yaml)``, compile excluded,
    after one warm-up application to a small BERT (imports and first-use caches not counted);
    ``repeats`` fresh models, the median reported, each run with the load other processes put on
    the machine meanwhile."""
    from transformers import BertConfig, BertForMaskedLM

    from common import SCHEDULES, foreign_cores
    from slapo_lightning import apply_schedule

    spec = str(SCHEDULES / "bert.yaml")
    apply_schedule(BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=2,
                                              intermediate_size=512)), spec)
    runs = []
    for _ in range(repeats):
        torch.manual_seed(0)
        model = BertForMaskedLM(BertConfig(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                                           intermediate_size=4096))
        wall, foreign = foreign_cores(lambda: _timed(lambda: apply_schedule(model, spec)))
        runs.append({"seconds": round(wall, 3), "foreign_cores": round(foreign, 2)})
        del model
        gc.collect()
    log(f"  apply_schedule(BERT-large): {runs}")
    return {"bert_large_apply_s": median([r["seconds"] for r in runs]), "runs": runs}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -- output ---------------------------------------------------------------------------------------

def records(results: list[dict], peak_flops: float) -> list[dict]:
    """One flat row per (recipe, variant), ratios against the HF sdpa baseline of the same recipe."""
    out = []
    for result in results:
        w: Workload = result["workload"]
        base = result["variants"][BASELINE]
        flops_step = result["flops_per_token"]["total"] * w.tokens
        for name, row in result["variants"].items():
            model_flops = flops_step / row["step_s"]
            out.append({
                "recipe": w.recipe, "variant": name, "label": row["label"], "model": w.describe(),
                "tokens_per_step": w.tokens, "step_s": round(row["step_s"], 4),
                "tokens_per_s": round(row["tokens_per_s"], 2),
                "speedup_vs_sdpa": round(row["tokens_per_s"] / base["tokens_per_s"], 4),
                "model_gflops_per_s": round(model_flops / 1e9, 2), "mfu": round(model_flops / peak_flops, 4),
                "total_peak_mib": _round(row.get("total_mib")), "step_peak_mib": _round(row.get("step_mib")),
                "memory_vs_sdpa": _ratio(row.get("total_mib"), base.get("total_mib")),
                "apply_s": _round(row["apply_s"], 3), "compile_s": _round(row["compile_s"], 2),
                "first_step_s": round(row["first_step_s"], 3), "eval_loss": row["eval_loss"],
                "disturbed_steps": row["disturbed_steps"],
            })
    return out


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def throughput_table(rows: list[dict]) -> str:
    columns = ["recipe", "variant", "tokens/s", "vs sdpa", "model GFLOP/s", "MFU", "peak MiB (total)",
               "peak MiB (step)", "memory vs sdpa", "apply_schedule s", "compile s"]
    body = [[r["recipe"], r["label"], fmt(r["tokens_per_s"]), f"{r['speedup_vs_sdpa']:.2f}x",
             fmt(r["model_gflops_per_s"]), f"{r['mfu']:.1%}", fmt(r["total_peak_mib"], 0),
             fmt(r["step_peak_mib"], 0), fmt(r["memory_vs_sdpa"], 2, "x"), fmt(r["apply_s"], 2),
             fmt(r["compile_s"], 1)] for r in rows]
    return markdown_table(columns, body, right_from=2)


def profile_table(profiles: dict[str, dict[str, dict]], peak_flops: float) -> str:
    columns = ["recipe", "variant", "profiled step s", "GEMM s", "GEMM share", "GEMM GFLOP", "GEMM GFLOP/s",
               "GEMM FLOP/s vs peak", "largest non-GEMM ops (s)"]
    body = []
    for recipe, by_variant in profiles.items():
        for name, p in by_variant.items():
            others = ", ".join([f"{k} {t:.2f}" for k, t, _ in p["top_ops"]
                                if k not in GEMM_OPERANDS and not k.startswith(("autograd::", "Optimizer."))][:5])
            rate = p["gemm_flops_per_s"]
            body.append([recipe, name, fmt(p["profiled_s"], 2), fmt(p["gemm_s"], 2), f"{p['gemm_share']:.0%}",
                         fmt(p["gemm_flops"] / 1e9, 0), fmt(rate and rate / 1e9),
                         fmt(rate and rate / peak_flops * 100, 0, "%"), others])
    return markdown_table(columns, body, right_from=2)


def targets_text(rows: list[dict], apply_s: float | None, device: str) -> str:
    """Each target of the issue, met or missed, from this run's numbers."""
    by = {(r["recipe"], r["variant"]): r for r in rows}
    lines = []
    for recipe, target in TARGETS.items():
        for variant in ("schedule", "schedule_regional"):
            r = by.get((recipe, variant))
            if r:
                verdict = "met" if r["speedup_vs_sdpa"] >= target else "missed"
                lines.append(f"- {recipe} {r['label']}: {r['speedup_vs_sdpa']:.2f}x HF sdpa tokens/s "
                             f"(target >= {target:.2f}x): {verdict}")
    for variant in ("schedule", "schedule_regional"):
        r = by.get(("gpt2", variant))
        if r:
            verdict = "met" if r["mfu"] >= MFU_TARGET else "missed"
            lines.append(f"- gpt2 {r['label']}: model FLOP/s = {r['mfu']:.1%} of the measured matmul peak "
                         f"(target >= {MFU_TARGET:.0%}): {verdict}")
    if apply_s is not None:
        verdict = "met" if apply_s < APPLY_TARGET_S else "missed"
        lines.append(f"- apply_schedule(BERT-large 24 layers, bert.yaml): {apply_s:.2f} s, median of 3 fresh "
                     f"models, compile excluded (target < {APPLY_TARGET_S:.0f} s): {verdict}")
    if device != "cuda":
        lines.append("- GPU targets: not measurable here (no CUDA device); `--preset gpu` runs them on a GPU.")
    return "\n".join(lines) + "\n"


def mfu_bound_text(results: list[dict], profiles: dict[str, dict[str, dict]], peak_flops: float) -> str:
    """What the profile says about the MFU target: with the GEMMs at the speed they ran and every
    other op free, MFU could reach ``bound``; reaching the target leaves ``budget`` seconds for
    everything that is not a GEMM, against the ``other`` seconds measured."""
    lines = []
    for result in results:
        w: Workload = result["workload"]
        flops_step = result["flops_per_token"]["total"] * w.tokens
        for name, p in profiles.get(w.recipe, {}).items():
            bound = flops_step / p["gemm_s"] / peak_flops
            budget = flops_step / (MFU_TARGET * peak_flops) - p["gemm_s"]
            other = p["profiled_s"] - p["gemm_s"]
            lines.append(f"- {w.recipe} {name}: GEMMs alone {p['gemm_s']:.2f} s -> MFU bound {bound:.0%} with all "
                         f"other ops free; {MFU_TARGET:.0%} MFU leaves {budget:.2f} s for the rest, "
                         f"measured {other:.2f} s")
    return "\n".join(lines) + "\n"


def bar_chart(path: Path, rows: list[dict], title: str) -> None:
    with figure_per_recipe(path, rows, title, panels=2, size=(6, 7)) as columns:
        for recipe, mine, (speed_ax, memory_ax) in columns:
            labels = [textwrap.fill(r["label"], 13) for r in mine]
            _bars(speed_ax, labels, [r["tokens_per_s"] for r in mine], [r["speedup_vs_sdpa"] for r in mine],
                  f"{recipe}: tokens/s", "x")
            if all(r["total_peak_mib"] is not None for r in mine):
                _bars(memory_ax, labels, [r["total_peak_mib"] for r in mine], [r["memory_vs_sdpa"] for r in mine],
                      f"{recipe}: peak memory MiB", "x")
            else:
                memory_ax.axis("off")


def _bars(ax, labels: list[str], values: list[float], ratios: list[float | None], title: str, suffix: str) -> None:
    palette = ["#999", "#4a7", "#69c", "#d84", "#a5c", "#cb5", "#5bb"]
    bars = ax.bar(range(len(values)), values, color=[palette[i % len(palette)] for i in range(len(values))])
    for bar, ratio in zip(bars, ratios):
        if ratio is not None:
            ax.annotate(f"{ratio:.2f}{suffix}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylim(top=1.15 * max(values))
    ax.set_title(title, fontsize=10)


# -- main -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULT_ROUNDS)
    parser.add_argument("--ablations", action="store_true", help=f"add the variants {', '.join(ABLATIONS)}")
    parser.add_argument("--variants", nargs="+", choices=THROUGHPUT_VARIANTS + ABLATIONS,
                        help=f"default: all ({', '.join(THROUGHPUT_VARIANTS)}); --quick: {', '.join(QUICK_VARIANTS)}")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    parser.add_argument("--no-apply-timing", action="store_true", help="skip the BERT-large apply_schedule timing")
    parser.add_argument("--profile", action="store_true", help="also profile one step per variant")
    args = parser.parse_args(argv)
    args.variants = args.variants or (QUICK_VARIANTS if args.quick else THROUGHPUT_VARIANTS)
    args.variants += [a for a in ABLATIONS if args.ablations and a not in args.variants]
    if BASELINE not in args.variants:
        parser.error(f"--variants must include the baseline {BASELINE!r}")
    settle_common_arguments(parser, args, DEFAULT_ROUNDS)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    started = time.perf_counter()
    info = machine_info(args.device)
    info["allocator"] = configure_allocator(args.device, args.allocator)
    log(f"machine: {info['cpu']}, {info['threads']} threads, load {info['loadavg_start']}")
    peaks = [matmul_peak_flops(args.device)]
    apply_timing = None if args.quick or args.no_apply_timing else bert_large_apply_seconds()
    results, profiles = [], {}
    for recipe in args.recipes:
        workload: Workload = PRESETS[args.preset][recipe]
        workload = workload.with_batch(args.batch) if args.batch else workload
        results.append(run_recipe(workload, args.variants, args.device, args.warmup, args.rounds))
        gc.collect()
    peaks.append(matmul_peak_flops(args.device))
    for result in results:
        if not args.no_memory:
            add_memory(result, args.device, args.warmup)
        if args.profile:
            profiles[result["workload"].recipe] = profile_recipe(result["workload"], args.variants, args.device,
                                                                 args.warmup)
    peak_flops = max(peaks)
    info.update(loadavg_end=os.getloadavg(), other_processes_end=other_busy_processes(),
                matmul_peak_gflops=[round(p / 1e9, 1) for p in peaks], wall_s=round(time.perf_counter() - started))
    rows = records(results, peak_flops)
    apply_s = apply_timing and apply_timing["bert_large_apply_s"]
    dtype = "bf16 autocast" if args.device == "cuda" else "fp32"
    header = (f"Training step throughput ({args.preset} preset, {dtype}), {info.get('gpu', info['cpu'])}, "
              f"{info['threads']} threads, allocator: {info['allocator']}, torch {info['torch']}, "
              f"transformers {info['transformers']}; "
              f"matmul peak {peak_flops / 1e9:.1f} GFLOP/s (best of start/end: {info['matmul_peak_gflops']}); "
              f"load average start {tuple(round(x, 2) for x in info['loadavg_start'])}, "
              f"end {tuple(round(x, 2) for x in info['loadavg_end'])}; median of {args.rounds} steps after "
              f"{args.warmup} warm-up")
    workloads = "\n".join(f"- {r['workload'].recipe}: {r['workload'].describe()}, model FLOPs/token "
                          f"{r['flops_per_token']['total'] / 1e6:.1f} M" for r in results)
    text = f"{header}\n\n{workloads}\n\n{throughput_table(rows)}\n{targets_text(rows, apply_s, args.device)}"
    if profiles:
        text += ("\nOne profiled step per variant (torch.profiler, self time):\n\n"
                 + profile_table(profiles, peak_flops) + "\n" + mfu_bound_text(results, profiles, peak_flops))
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"train_throughput_{args.preset}{args.tag}"
    stem.with_suffix(".md").write_text(text)
    write_csv(stem.with_suffix(".csv"), rows)
    write_json(stem.with_suffix(".json"), {"machine": info, "args": vars(args), "apply_timing": apply_timing,
                                           "rows": rows, "flops_per_token": {r["workload"].recipe: r["flops_per_token"]
                                                                             for r in results},
                                           "profiles": profiles})
    bar_chart(stem.with_suffix(".png"), rows, header[:200])
    return stem


if __name__ == "__main__":
    main()
