"""BERT fine-tuning with a padding collator: Hugging Face sdpa vs the shipped BERT schedule, on a
mix of padded and unpadded batches (and batches without a mask), as a classifier sees them.

Usage: ``python benchmarks/finetune.py [--quick] [--rounds N] [--batch N] [--max-len N]``

Reports tokens/s (real tokens, and the padded batch size the model computes on), peak memory of
the largest batch's training step (model, AdamW state and
activations, over the process before the model) in a fresh process per variant, and what the schedule's specialisations cost:
the traced modules' dispatches per step, the measured time of one dispatch (call key, lookup,
guard nodes), and that cost as a share of the step. Every variant runs the same batches in the
same order, round by round alternating which goes first.

Writes ``benchmarks/results/finetune_<preset>.{md,json}``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    MALLOC_ENV, RESULTS, SCHEDULES, configure_allocator, fmt, foreign_cores, log, machine_info, markdown_table,
    median, write_json,
)

PRESETS = {
    "quick": dict(layers=2, hidden=64, heads=4, batch=4, min_len=8, max_len=32, batches=6),
    "cpu": dict(layers=4, hidden=512, heads=8, batch=8, min_len=32, max_len=256, batches=8),
}
VARIANTS = ("sdpa", "schedule")
NUM_LABELS = 3


def make_model(preset: dict, variant: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=preset["hidden"], num_hidden_layers=preset["layers"],
                        num_attention_heads=preset["heads"], intermediate_size=4 * preset["hidden"],
                        max_position_embeddings=512, num_labels=NUM_LABELS, attn_implementation="sdpa")
    model = BertForSequenceClassification(config)
    if variant == "schedule":
        from slapo_lightning import apply_schedule

        apply_schedule(model, str(SCHEDULES / "bert.yaml"))
    return model.train()


def make_batches(preset: dict) -> list[dict]:
    """Padded to the longest in each batch; every other batch has sequences of one length, and
    half of those come without a mask (a collator that skips all-ones masks)."""
    generator = torch.Generator().manual_seed(0)
    batches = []
    for index in range(preset["batches"]):
        if index % 2:
            length = int(torch.randint(preset["min_len"], preset["max_len"] + 1, (1,), generator=generator))
            lengths = [length] * preset["batch"]
        else:
            lengths = torch.randint(preset["min_len"], preset["max_len"] + 1, (preset["batch"],),
                                    generator=generator).tolist()
        longest = max(lengths)
        ids = torch.zeros(len(lengths), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, :n] = torch.randint(1000, 30000, (n,), generator=generator)
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask,
                 "labels": torch.randint(0, NUM_LABELS, (len(lengths),), generator=generator)}
        if index % 4 == 3:
            del batch["attention_mask"]
        batches.append(batch)
    return batches


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def dispatch_cost(model: torch.nn.Module, batches: list[dict]) -> dict:
    """Dispatches per step and the time one takes (call key + lookup + the guard nodes the
    specialisation runs), measured on the real arguments of every traced module's calls."""
    from slapo_lightning.core import TracedModule
    from slapo_lightning.core.tracer.guards import GUARDS

    traced = [m for m in model.modules() if isinstance(m, TracedModule)]
    calls: list[tuple] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, k: calls.append((mod, a, k)), with_kwargs=True)
               for m in traced]
    with torch.no_grad():
        for batch in batches:
            model(**{k: v for k, v in batch.items() if k != "labels"})
    for h in handles:
        h.remove()
    repeats = 200
    start = time.perf_counter()
    for _ in range(repeats):
        for module, args, kwargs in calls:
            state = module.__dict__["_slapo_state"]
            state.by_key.get(state.call_key(module, args, kwargs))
    key_s = (time.perf_counter() - start) / (repeats * len(calls))
    guards_per_call = []
    for module, args, kwargs in calls:
        state = module.__dict__["_slapo_state"]
        spec = state.by_key[state.call_key(module, args, kwargs)][0]
        guards_per_call.append(sum(1 for n in spec.graph.nodes if n.op == "call_function" and n.target in GUARDS))
    one_guard = _one_guard_seconds()
    per_call = key_s + one_guard * (sum(guards_per_call) / len(calls))
    return {"dispatches_per_step": len(calls) / len(batches), "dispatch_us": per_call * 1e6,
            "key_us": key_s * 1e6, "guards_per_dispatch": sum(guards_per_call) / len(calls),
            "specialisations": {type(m).__name__: len(m.specialisations) for m in traced}}


def _one_guard_seconds() -> float:
    from slapo_lightning.core.tracer.guards import expect_equal

    value, repeats = 2, 100_000
    start = time.perf_counter()
    for _ in range(repeats):
        expect_equal(value, 2, "bench")
    return (time.perf_counter() - start) / repeats


def worker(preset_name: str, variant: str, rounds: int) -> dict:
    """One variant alone in this process: timed steps, one step's peak RSS, dispatch cost."""
    configure_allocator("cpu", "retain")
    import transformers  # noqa: F401  (imported before the baseline)

    import slapo_lightning.spec  # noqa: F401

    preset = PRESETS[preset_name]
    batches = make_batches(preset)
    baseline_mib = _status_mib("VmRSS")
    model = make_model(preset, variant)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    for batch in batches:
        step(model, optimizer, batch)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    step(model, optimizer, max(batches, key=lambda b: b["input_ids"].numel()))
    peak_mib = _status_mib("VmHWM") - baseline_mib
    times, disturbed = [], 0
    for _ in range(rounds):
        for batch in batches:
            wall, foreign = foreign_cores(lambda: step(model, optimizer, batch))
            disturbed += foreign > 0.2
            times.append(wall)
    per_round = [sum(times[i:i + len(batches)]) for i in range(0, len(times), len(batches))]
    result = {"variant": variant, "round_s": median(per_round), "peak_mib": peak_mib, "disturbed_steps": disturbed,
              "real_tokens": sum(int(b.get("attention_mask", torch.ones_like(b["input_ids"])).sum()) for b in batches),
              "computed_tokens": sum(b["input_ids"].numel() for b in batches)}
    if variant == "schedule":
        result["dispatch"] = dispatch_cost(model, batches)
    gc.collect()
    return result


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":")) / 1024


def run_variant(preset: str, variant: str, rounds: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps([preset, variant, rounds])],
                          capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if done.returncode:
        raise RuntimeError(f"{variant} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(preset: str, results: dict[str, dict]) -> str:
    base, sched = results["sdpa"], results["schedule"]
    rows = []
    for name in VARIANTS:
        r = results[name]
        rows.append([name, fmt(r["real_tokens"] / r["round_s"], 0), fmt(r["computed_tokens"] / r["round_s"], 0),
                     fmt(base["round_s"] / r["round_s"], 2, "x"), fmt(r["peak_mib"], 0),
                     fmt(r["peak_mib"] / base["peak_mib"], 2, "x"), str(r["disturbed_steps"])])
    table = markdown_table(["variant", "real tokens/s", "computed tokens/s", "speed vs sdpa", "peak MiB",
                            "peak vs sdpa", "disturbed steps"], rows)
    d = sched["dispatch"]
    step_s = sched["round_s"] / PRESETS[preset]["batches"]
    share = d["dispatches_per_step"] * d["dispatch_us"] * 1e-6 / step_s
    lines = [table, "",
             f"Specialisations: {d['specialisations']}; {d['dispatches_per_step']:.0f} dispatches per step, "
             f"{d['dispatch_us']:.1f} us each (call key + lookup {d['key_us']:.1f} us, "
             f"{d['guards_per_dispatch']:.1f} guard nodes); {100 * share:.3f}% of a {step_s * 1e3:.0f} ms step."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    preset = "quick" if args.quick else "cpu"
    rounds = args.rounds or (1 if args.quick else 3)
    results = {}
    for variant in VARIANTS:
        log(f"finetune {preset}: {variant}")
        results[variant] = run_variant(preset, variant, rounds)
    text = report(preset, results)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"finetune_{preset}.json", {"machine": machine_info("cpu"), "preset": PRESETS[preset],
                                                      "results": results})
    path = args.out / f"finetune_{preset}.md"
    path.write_text(f"# BERT fine-tuning with a padding collator ({preset})\n\n{text}\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(*json.loads(sys.argv[2]))))
    else:
        main()
