"""What the training benchmarks share: workloads, variants, one training step, FLOPs, peaks, output.

A *workload* is a recipe's LightningModule (``CausalLMModule`` / ``MaskedLMModule``) at one model
size, sequence length and batch. A *variant* is how the module is run: Hugging Face attention
implementation, the shipped schedule (optionally with passes switched on or off), torch.compile.
A *trainee* is a built variant with the recipe's own optimizer and a fixed batch, ready to step.

Peak memory is measured in a fresh process per variant (``python benchmarks/common.py --worker``),
so that one variant's freed-but-resident memory never counts for another:

* CPU: after warm-up, the kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``)
  and one step runs. ``total`` = peak RSS of that step minus the RSS after imports, before the
  model was built (weights, gradients, AdamW state, activations, workspaces: what
  ``torch.cuda.max_memory_allocated`` counts on a GPU); ``step`` = peak RSS of the step minus the
  RSS just before it (the step's transient memory: activations, gradients, workspaces). glibc is
  told to return every freed block over 128 KiB to the system (``MALLOC_ENV``), else memory freed
  by the warm-up would be reused unseen. Linux only.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  allocation before the model was built (total) or before the step (step).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = Path(__file__).resolve().parents[1] / "slapo_lightning" / "configs" / "schedule"
IGNORE_INDEX = -100
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
"""Fixed glibc thresholds for the memory workers: every block over 128 KiB is its own mapping,
returned to the system when freed (glibc otherwise raises the threshold up to 32 MiB after big
frees and keeps the blocks resident)."""


# -- workloads ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    """One recipe model at one size, sequence length and batch (random init, nothing downloaded)."""

    recipe: str
    config: dict[str, Any]
    vocab_size: int
    seq: int
    batch: int
    mlm_probability: float = 0.15

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def with_batch(self, batch: int) -> "Workload":
        return Workload(self.recipe, self.config, self.vocab_size, self.seq, batch, self.mlm_probability)

    def describe(self) -> str:
        c = self.config
        layers = c.get("n_layer", c.get("num_hidden_layers"))
        hidden = c.get("n_embd", c.get("hidden_size"))
        return f"{layers} layers, hidden {hidden}, vocab {self.vocab_size}, seq {self.seq}, batch {self.batch}"


def gpt2_config(layers: int, hidden: int, seq: int) -> dict[str, Any]:
    return {"n_layer": layers, "n_embd": hidden, "n_head": hidden // 64, "n_positions": seq}


def llama_config(layers: int, hidden: int, seq: int, heads: int, kv_heads: int) -> dict[str, Any]:
    """Llama's shape: intermediate about 8/3 of hidden (a multiple of 8), grouped k/v heads."""
    return {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": (8 * hidden // 3 + 7) // 8 * 8,
            "max_position_embeddings": seq}


def bert_config(layers: int, hidden: int, seq: int) -> dict[str, Any]:
    return {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": hidden // 64,
            "intermediate_size": 4 * hidden, "max_position_embeddings": seq}


PRESETS: dict[str, dict[str, Workload]] = {
    "quick": {
        "gpt2": Workload("gpt2", gpt2_config(2, 128, 128), 50257, 128, 2),
        "bert": Workload("bert", bert_config(2, 128, 128), 30522, 128, 2),
        "llama": Workload("llama", llama_config(2, 128, 128, 4, 2), 32000, 128, 2),
    },
    "cpu": {
        "gpt2": Workload("gpt2", gpt2_config(4, 512, 1024), 50257, 1024, 2),
        "bert": Workload("bert", bert_config(4, 512, 512), 30522, 512, 4),
        "llama": Workload("llama", llama_config(4, 512, 1024, 8, 2), 32000, 1024, 2),
    },
    "gpu": {
        "gpt2": Workload("gpt2", gpt2_config(24, 1024, 1024), 50257, 1024, 8),
        "bert": Workload("bert", bert_config(24, 1024, 512), 30522, 512, 16),
        "llama": Workload("llama", llama_config(16, 2048, 2048, 32, 8), 32000, 2048, 4),
    },
}
"""``cpu``: small-but-real widths that finish in minutes on 2 cores, GPT-2's full vocabulary (the
LM head is where the fused linear+cross-entropy matters). ``gpu``: GPT-2-medium and BERT-large."""

DECODER_TYPES = ("mistral", "qwen2", "qwen3", "phi3", "gemma", "olmo2")
"""Decoders benchmarked under the ``auto`` schedule besides the llama recipe (``--preset decoders``):
the same small shape for each, so that one table compares what ``auto`` does to each family."""
PRESETS["decoders"] = {
    name: Workload(name, {**llama_config(2, 256, 512, 4, 2), "head_dim": 64, "pad_token_id": 0}, 32000, 512, 2)
    for name in ("llama", *DECODER_TYPES)
}


# -- variants -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """How a workload runs: ``attn`` is HF's attn_implementation; ``schedule`` applies the shipped
    spec of the recipe with ``passes`` overriding fields of its passes (``{"checkpoint":
    {"enabled": True}}``, as Hydra overrides would); ``compile`` is None,
    ``"whole"`` (torch.compile of the module's loss: the whole forward) or ``"regional"``
    (torch.compile of each transformer block in place)."""

    name: str
    label: str
    attn: str = "sdpa"
    schedule: bool = False
    passes: dict[str, dict[str, Any]] = field(default_factory=dict)
    compile: str | None = None


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("eager", "HF eager", attn="eager"),
    Variant("sdpa", "HF sdpa (baseline)"),
    Variant("compile", "torch.compile(HF sdpa)", compile="whole"),
    Variant("schedule", "shipped schedule", schedule=True),
    Variant("schedule_regional", "schedule + regional compile", schedule=True, compile="regional"),
    Variant("schedule_checkpoint", "schedule + checkpointing", schedule=True,
            passes={"checkpoint": {"enabled": True}}),
    Variant("schedule_sdpa_attention", "schedule, attention on sdpa", schedule=True,
            passes={"flash_attention": {"backend": "sdpa"}}),
    Variant("schedule_unfused_ce", "schedule without fused CE", schedule=True,
            passes={"fused_cross_entropy": {"enabled": False}}),
)}


def schedule_spec(recipe: str, passes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The shipped spec of ``recipe`` (``configs/schedule/<its schedule>.yaml``), pass fields overridden."""
    import yaml

    spec = yaml.safe_load((SCHEDULES / f"{RECIPES[recipe].schedule}.yaml").read_text())
    for name, fields in passes.items():
        spec["passes"][name].update(fields)
    return spec


# -- building and stepping ------------------------------------------------------------------------

@dataclass
class Trainee:
    """A built variant: the LightningModule, the recipe's optimizer and LR scheduler, one batch."""

    workload: Workload
    variant: Variant
    module: Any
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    batch: dict[str, torch.Tensor]
    device: str
    apply_s: float | None = None
    step_times: list[float] = field(default_factory=list)
    disturbed: int = 0


@dataclass(frozen=True)
class Recipe:
    """What differs between the recipes' models, in one place. ``causal``: next-token prediction
    on every position (else masked LM); ``blocks``: the transformer blocks (regional compile, FLOPs);
    ``body_extra`` / ``head_extra``: per-token weights outside the blocks and the tied projection."""

    module_class: str
    causal: bool
    blocks: Callable[[Any], torch.nn.ModuleList]
    body_extra: Callable[[Any], torch.nn.Module | None]
    head_extra: Callable[[Any], torch.nn.Module | None]
    schedule: str
    model_type: str | None = None


RECIPES = {
    "gpt2": Recipe("CausalLMModule", True, lambda model: model.transformer.h, lambda model: model.transformer.ln_f,
                   lambda model: None, "gpt2"),
    "bert": Recipe("MaskedLMModule", False, lambda model: model.bert.encoder.layer, lambda model: None,
                   lambda model: model.cls.predictions.transform, "bert"),
    "llama": Recipe("CausalLMModule", True, lambda model: model.model.layers, lambda model: model.model.norm,
                    lambda model: None, "auto", "llama"),
    **{name: Recipe("CausalLMModule", True, lambda model: model.model.layers, lambda model: model.model.norm,
                    lambda model: None, "auto", name) for name in DECODER_TYPES},
}


def module_class(recipe: str):
    import slapo_lightning.lightning as recipes

    return getattr(recipes, RECIPES[recipe].module_class)


def build_module(workload: Workload, attn: str, device: str):
    """The recipe's LightningModule, seeded so that every variant starts from the same weights."""
    torch.manual_seed(0)
    model_type = RECIPES[workload.recipe].model_type
    module = module_class(workload.recipe)(
        size="bench", sizes={"bench": workload.config}, vocab_size=workload.vocab_size, attn_implementation=attn,
        **({"model_type": model_type} if model_type else {}),
    )
    return module.to(device).train()


def make_batch(workload: Workload, device: str) -> dict[str, torch.Tensor]:
    """Packed full-length blocks (no padding, as the recipes' data module makes them). Causal LM:
    labels are the ids; masked LM: ``mlm_probability`` of the positions are predicted."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1000, workload.vocab_size, (workload.batch, workload.seq), generator=generator)
    if RECIPES[workload.recipe].causal:
        return {"input_ids": ids.to(device), "labels": ids.to(device)}
    predicted = torch.rand(ids.shape, generator=generator) < workload.mlm_probability
    labels = torch.where(predicted, ids, IGNORE_INDEX)
    masked = torch.where(predicted, 103, ids)
    return {"input_ids": masked.to(device), "labels": labels.to(device)}


def transformer_blocks(module, recipe: str) -> torch.nn.ModuleList:
    return RECIPES[recipe].blocks(module.model)


def apply_variant(module, workload: Workload, variant: Variant) -> float | None:
    """Schedule and/or compile ``module`` as ``variant`` says; returns apply_schedule's wall time."""
    from slapo_lightning import apply_schedule

    apply_s = None
    if variant.schedule:
        spec = schedule_spec(workload.recipe, variant.passes)
        start = time.perf_counter()
        apply_schedule(module.model, spec)
        apply_s = time.perf_counter() - start
    if variant.compile == "whole":
        module.loss = torch.compile(module.loss)
    elif variant.compile == "regional":
        blocks = transformer_blocks(module, workload.recipe)
        # Every traced block has its own GraphModule class, so dynamo compiles each block once
        # (a type guard): without room for all of them, blocks past the limit would run eagerly.
        torch._dynamo.config.recompile_limit += len(blocks)
        for block in blocks:
            block.compile()
    return apply_s


@contextlib.contextmanager
def stand_in_trainer(module, total_steps: int):
    """``configure_optimizers`` reads only ``trainer.estimated_stepping_batches``; this lends the
    module that much of a trainer, so the benchmark steps the recipe's very optimizer and LR
    schedule without Lightning's loop around them."""
    module._trainer = SimpleNamespace(estimated_stepping_batches=total_steps)
    try:
        yield
    finally:
        module._trainer = None


def build_trainee(workload: Workload, variant: Variant, device: str, total_steps: int = 1000) -> Trainee:
    module = build_module(workload, variant.attn, device)
    apply_s = apply_variant(module, workload, variant)
    with stand_in_trainer(module, total_steps):
        configured = module.configure_optimizers()
    return Trainee(workload, variant, module, configured["optimizer"], configured["lr_scheduler"]["scheduler"],
                   make_batch(workload, device), device, apply_s)


def autocast(device: str):
    """bf16 mixed precision on CUDA (fp32 weights, like Lightning's ``bf16-mixed``); fp32 on CPU."""
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(trainee: Trainee) -> float:
    """forward + loss + backward + AdamW step + LR step, as Lightning's automatic optimisation
    does it (zero_grad with set_to_none); returns the step's wall time in seconds."""
    synchronize(trainee.device)
    start = time.perf_counter()
    with autocast(trainee.device):
        loss, _ = trainee.module.loss(trainee.batch)
    loss.backward()
    trainee.optimizer.step()
    trainee.lr_scheduler.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    synchronize(trainee.device)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def eval_loss(trainee: Trainee) -> float:
    """Loss in eval mode (no dropout), to check that variants compute the same model."""
    trainee.module.eval()
    with torch.no_grad(), autocast(trainee.device):
        loss, _ = trainee.module.loss(trainee.batch)
    trainee.module.train()
    return float(loss)


# -- FLOPs ----------------------------------------------------------------------------------------

def flops_per_token(workload: Workload, module, head_fraction: float) -> dict[str, float]:
    """Model FLOPs of one training step (forward + backward = 3 forwards) per input token:

        6 * N_body + 12 * layers * hidden * seq + f * 6 * (N_head + vocab * hidden)

    ``N_body``: parameters of the transformer outside embeddings and LM head (every weight does one
    multiply-add per token forward); ``12 * L * H * S``: attention scores and mixing (PaLM, app. B);
    the LM head (BERT: transform + tied decoder; GPT-2: tied projection, counted as a matmul of
    vocab x hidden) runs on the fraction ``f`` = ``head_fraction`` of tokens that are predicted
    (GPT-2: all but the last of each row; BERT: the masked ones, all the recipe computes it on).
    Recomputation (checkpointing) is not counted: these are model FLOPs, not hardware FLOPs."""
    model = module.model
    config = model.config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    parts = RECIPES[workload.recipe]
    n_body = _parameter_count(parts.blocks(model)) + _parameter_count(parts.body_extra(model))
    n_head = _parameter_count(parts.head_extra(model))
    attention = 12 * layers * hidden * workload.seq
    head = 6 * (n_head + config.vocab_size * hidden)
    return {"body": 6 * n_body, "attention": attention, "head": head_fraction * head,
            "total": 6 * n_body + attention + head_fraction * head}


def _parameter_count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def head_fraction(workload: Workload, batch: dict[str, torch.Tensor]) -> float:
    """Fraction of the batch's tokens that go through the LM head in the recipe's loss."""
    if RECIPES[workload.recipe].causal:
        return (workload.seq - 1) / workload.seq
    return float((batch["labels"] != IGNORE_INDEX).float().mean())


# -- matmul peak ----------------------------------------------------------------------------------

def matmul_peak_flops(device: str, sizes: Iterable[int] = (2048, 4096), repeats: int = 5) -> float:
    """Best FLOP/s of large square matmuls (fp32 on CPU, bf16 on CUDA): the machine's attainable
    GEMM peak that MFU is measured against."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    best = 0.0
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            synchronize(device)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


# -- peak memory in a fresh process ---------------------------------------------------------------

def _proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field_name + ":"))


def _cpu_rss_mib() -> float:
    return _proc_status_kib("VmRSS") / 1024


def _cpu_step_peak_mib(trainee: Trainee) -> float:
    """Peak RSS (MiB) during one step, measured from a freshly reset high-water mark."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    train_step(trainee)
    return _proc_status_kib("VmHWM") / 1024


def _allocated_mib(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else _cpu_rss_mib()


def measure_peak(workload: dict, variant: str, device: str, warmup: int) -> dict[str, float]:
    """Worker: build one variant alone in this process, warm it up, measure one step's peak."""
    from transformers import BertForMaskedLM, GPT2LMHeadModel  # noqa: F401  (import before the baseline)

    import slapo_lightning.lightning  # noqa: F401

    work = Workload(**workload)
    baseline = _allocated_mib(device)
    trainee = build_trainee(work, VARIANTS[variant], device)
    for _ in range(warmup):
        train_step(trainee)
    before_step = _allocated_mib(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        train_step(trainee)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _cpu_step_peak_mib(trainee)
    return {"total_mib": peak - baseline, "step_mib": peak - before_step, "resident_mib": before_step - baseline}


def peak_in_fresh_process(workload: Workload, variant: str, device: str, warmup: int = 2) -> dict[str, float]:
    """:func:`measure_peak` in a new Python process (with ``MALLOC_ENV`` on CPU)."""
    job = {"workload": asdict(workload), "variant": variant, "device": device, "warmup": warmup}
    env = {**os.environ, **(MALLOC_ENV if device == "cpu" else {})}
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise RuntimeError(f"memory worker for {variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- timing ---------------------------------------------------------------------------------------

FOREIGN_CPU_LIMIT = 0.2
"""A timed step during which other processes kept more than this many cores busy on average is
taken again (the cores are shared with other people's test runs)."""


def _busy_cpu_s() -> float | None:
    """Machine-wide busy CPU seconds so far (Linux ``/proc/stat``), None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def foreign_cores(step: Callable[[], float]) -> tuple[float, float]:
    """Runs ``step`` (returns its wall time); also returns how many cores other processes kept
    busy meanwhile (machine-wide busy time minus this process's own CPU time, per second)."""
    busy, own = _busy_cpu_s(), _own_cpu_s()
    wall = step()
    if busy is None:
        return wall, 0.0
    return wall, max(0.0, (_busy_cpu_s() - busy) - (_own_cpu_s() - own)) / wall


def clean_step(trainee: Trainee, retries: int = 3) -> float:
    """One timed step, retaken (up to ``retries`` times) while other processes used more than
    ``FOREIGN_CPU_LIMIT`` cores during it; ``trainee.disturbed`` counts the discarded steps."""
    for _ in range(retries):
        wall, foreign = foreign_cores(lambda: train_step(trainee))
        if foreign <= FOREIGN_CPU_LIMIT:
            return wall
        trainee.disturbed += 1
    return wall


def warm_up(trainees: list[Trainee], steps: int) -> dict[str, float]:
    """``steps`` untimed steps per trainee; returns each one's first-step time (compilation included)."""
    first = {}
    for trainee in trainees:
        first[trainee.variant.name] = train_step(trainee)
        for _ in range(steps - 1):
            train_step(trainee)
    return first


def timed_rounds(trainees: list[Trainee], rounds: int, log: Callable[[str], None] = print) -> None:
    """``rounds`` rounds of one step per trainee, the order rotated each round, so that drift and
    load from other processes hit every variant alike. Times go to ``trainee.step_times``."""
    for r in range(rounds):
        shift = r % len(trainees)
        for trainee in trainees[shift:] + trainees[:shift]:
            trainee.step_times.append(clean_step(trainee) if trainee.device == "cpu" else train_step(trainee))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{t.variant.name} {t.step_times[-1]:.2f}s" for t in trainees))


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- allocator ------------------------------------------------------------------------------------

ALLOCATORS = ("retain", "default")


def configure_allocator(device: str, mode: str) -> str:
    """``retain``: on CPU, freed memory is kept and reused (what the recipes' CPUAllocatorCallback
    does during training, see ``slapo_lightning/lightning/cpu_allocator.py``); ``default``: glibc
    as it comes, every large buffer page-faulted anew each step. Returns what is in effect."""
    if device != "cpu" or mode == "default":
        return "default" if device == "cpu" else "CUDA caching allocator"
    from slapo_lightning.lightning.cpu_allocator import retain_freed_memory

    return "retain freed memory (mallopt)" if retain_freed_memory() else "default (mallopt unavailable)"


# -- command line ---------------------------------------------------------------------------------

def add_common_arguments(parser: argparse.ArgumentParser, default_rounds: int) -> None:
    """The options every training benchmark takes."""
    parser.add_argument("--quick", action="store_true", help="tiny models, few steps: a smoke run (preset quick)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu with CUDA, else cpu")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["gpt2", "bert"])
    parser.add_argument("--batch", type=int, help="override the preset's batch size for every recipe")
    parser.add_argument("--rounds", type=int, help=f"timed steps per variant (default {default_rounds}, quick 2)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per variant (default 2, quick 1)")
    parser.add_argument("--allocator", choices=ALLOCATORS, default="retain",
                        help="CPU: keep freed memory for reuse, as the recipes do (default), or glibc's default")
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the result files")


def settle_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, default_rounds: int) -> None:
    """Preset, device, rounds and warm-up from what was given (``--quick``: tiny models, 2 rounds)."""
    args.preset = "quick" if args.quick else args.preset or ("gpu" if torch.cuda.is_available() else "cpu")
    if args.preset == "gpu" and not torch.cuda.is_available():
        parser.error("--preset gpu needs a CUDA GPU")
    args.device = "cuda" if args.preset == "gpu" else "cpu"
    args.rounds = args.rounds or (2 if args.quick else default_rounds)
    args.warmup = args.warmup or (1 if args.quick else 2)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- machine and output ---------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def other_busy_processes() -> list[str]:
    """Other pytest / training / benchmark processes on this machine (they share the cores)."""
    mine = {os.getpid(), os.getppid()}
    busy = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in mine:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(word in cmdline for word in ("pytest", "slapo-train", "slapo_lightning.cli", "benchmarks/")):
            busy.append(f"{pid}: {cmdline[:120].strip()}")
    return busy


def machine_info(device: str) -> dict[str, Any]:
    import lightning
    import transformers

    info = {
        "device": device,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lightning": lightning.__version__,
        "loadavg_start": os.getloadavg(),
        "other_processes_start": other_busy_processes(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


@contextlib.contextmanager
def figure_per_recipe(path: Path, rows: list[dict], title: str, panels: int, size: tuple[float, float]):
    """A matplotlib (Agg) figure with a column of ``panels`` axes per recipe of ``rows``, saved to
    ``path`` on exit; yields ``(recipe, the recipe's rows, its axes top to bottom)`` per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r["recipe"] for r in rows))
    fig, axes = plt.subplots(panels, len(recipes), figsize=(size[0] * len(recipes), size[1]), squeeze=False)
    yield [(recipe, [r for r in rows if r["recipe"] == recipe], [axes[i][col] for i in range(panels)])
           for col, recipe in enumerate(recipes)]
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(columns: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(columns))]
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def write_csv(path: Path, records: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(key for record in records for key in record))
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def main_worker(argv: list[str]) -> None:
    job = json.loads(argv[argv.index("--worker") + 1])
    print(json.dumps(measure_peak(**job)))


if __name__ == "__main__":
    main_worker(sys.argv)
