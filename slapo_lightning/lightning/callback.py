"""``ScheduleCallback``: apply a schedule spec to a LightningModule's model before training.

Where it hooks in (Lightning 2.x ``Trainer._run``): ``setup`` (every rank) -> ``configure_model``
-> checkpoint restore (weights, then callbacks) -> strategy setup (DDP wrap, optimizers) ->
optimizer state restore -> training. The schedule is applied in ``setup`` when the target module
already exists, otherwise right after the module's ``configure_model``; either way before DDP
wraps the model and before optimizers see its parameters. A checkpoint's schedule fingerprint is
checked in ``on_load_checkpoint``, before optimizer state is restored.
"""
from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from ..core.primitives.parallel import DATA_PARALLEL, sub_mesh
from ..core.verify import whole_tensor
from ..errors import CheckpointMismatchError, ScheduleError, VerificationError
from ..report import Report
from ..tolerances import DEFAULT_ATOL, DEFAULT_RTOL
from ..spec import apply_schedule, load_spec
from ..spec.bisect import verify_schedule

REPORT_FILE = "schedule_report.json"
APPLIED = "_slapo_applied_schedules"
VERIFY_MODES = (False, "first_batch")
REFUSED_STRATEGIES = {
    "FSDPStrategy": "Lightning's FSDPStrategy is FSDP1, which wraps modules in FullyShardedDataParallel and flattens "
                    "their parameters under the schedule; use ModelParallelStrategy (FSDP2 and tensor parallelism on "
                    "DTensor), where the schedule's fully_shard and parallelize passes apply over its device mesh",
    "DeepSpeedStrategy": "DeepSpeed partitions parameters and owns the optimizer",
    "XLAFSDPStrategy": "FSDP on XLA shards parameters, which the schedule's state-dict hooks do not follow",
}
SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)

StepFn = Callable[[pl.LightningModule, Any, int], Any]


def training_step_outputs(pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Any:
    """What verification compares by default: the module's own ``training_step`` (its loss)."""
    return pl_module.training_step(batch, batch_idx)


class ScheduleCallback(Callback):
    """Apply ``schedule`` (dict, DictConfig, YAML path or ScheduleSpec) to ``pl_module.<target>``.

    Args:
        schedule: the spec; checked when the callback is built, so a bad spec fails before training.
        target: dotted path of the module to schedule inside the LightningModule (selectors in the
            spec are relative to it).
        verify: ``False`` or ``"first_batch"`` (``True`` means the same): before the first optimizer step, compare outputs and
            gradients of the scheduled model against an unscheduled copy on the first training batch
            (dropout off) and stop, naming the first pass that breaks equivalence.
        example_inputs: inputs of the target module like the real ones (dict of keyword arguments,
            tuple, or ``fn(pl_module) -> inputs``) for tracing; defaults to
            ``pl_module.example_input_array`` when set, else the core's default for HF models.
        report_path: where to save the JSON report; default ``<trainer.log_dir>/schedule_report.json``.
        rtol, atol: verification tolerances (default ``slapo_lightning.tolerances``).
        verify_fn: ``fn(pl_module, batch, batch_idx) -> outputs`` compared by verification;
            default ``pl_module.training_step`` with logging muted.
        print_report: render the report table on rank 0.
    """

    def __init__(self, schedule: Any, target: str = "model", verify: bool | str = False, example_inputs: Any = None,
                 report_path: str | None = None, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL,
                 verify_fn: StepFn | None = None, print_report: bool = True):
        if verify is True:
            verify = "first_batch"
        if verify not in VERIFY_MODES and verify is not None:
            raise ScheduleError(f"ScheduleCallback: verify={verify!r} is not supported; "
                                f"valid: false, 'first_batch' (or true, the same)")
        self.spec = load_spec(schedule)
        self.fingerprint = self.spec.fingerprint()
        self.target = target
        self.verify = verify or False
        self.example_inputs = example_inputs
        self.report_path = report_path
        self.rtol, self.atol = rtol, atol
        self.verify_fn = verify_fn or training_step_outputs
        self.print_report = print_report
        self.report: Report | None = None
        self._original: nn.Module | None = None
        self._verified = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=self.target)

    # -- applying ----------------------------------------------------------------------------------
    @staticmethod
    def check_strategy(strategy: Any) -> None:
        """ScheduleError unless the callback can run under ``strategy`` (the CLI asks before launching)."""
        for cls in type(strategy).__mro__:
            if cls.__name__ in REFUSED_STRATEGIES:
                raise ScheduleError(f"ScheduleCallback does not support {type(strategy).__name__}: "
                                    f"{REFUSED_STRATEGIES[cls.__name__]}")
        if not isinstance(strategy, SUPPORTED_STRATEGIES):
            raise ScheduleError(f"ScheduleCallback does not support {type(strategy).__name__}; supported: "
                                f"{', '.join(c.__name__ for c in SUPPORTED_STRATEGIES)} (and their subclasses)")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.check_strategy(trainer.strategy)
        if isinstance(trainer.strategy, ModelParallelStrategy):
            self._apply_after_configure_model(trainer, pl_module)  # over the strategy's mesh, before optimizers
        elif _find(pl_module, self.target) is not None:
            self._apply(trainer, pl_module)
        elif _overrides_configure_model(pl_module):
            self._apply_after_configure_model(trainer, pl_module)
        else:
            children = ", ".join(n for n, _ in pl_module.named_children()) or "(none)"
            raise ScheduleError(f"ScheduleCallback: {type(pl_module).__name__} has no module {self.target!r} and no "
                                f"configure_model that could build it; its children: {children}")

    def _apply_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        configure = pl_module.configure_model
        if getattr(configure, "_slapo_callback", None) is self:
            return

        def configure_model() -> None:
            configure()
            if _find(pl_module, self.target) is None:
                raise ScheduleError(f"ScheduleCallback: configure_model of {type(pl_module).__name__} did not "
                                    f"build a module {self.target!r}")
            self._apply(trainer, pl_module)

        configure_model._slapo_callback = self
        pl_module.configure_model = configure_model

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = _find(pl_module, self.target)
        applied = getattr(model, APPLIED, ())
        if self.fingerprint in applied:
            return
        if self.verify and not self._verified:
            self._original = copy.deepcopy(model)
        mesh = trainer.strategy.device_mesh if isinstance(trainer.strategy, ModelParallelStrategy) else None
        self.report = apply_schedule(model, self.spec, self._examples(pl_module), device_mesh=mesh)
        setattr(model, APPLIED, (*applied, self.fingerprint))
        self._publish(trainer)

    def _examples(self, pl_module: pl.LightningModule) -> Any:
        examples = self.example_inputs
        if callable(examples):
            return examples(pl_module)
        if examples is None:
            examples = getattr(pl_module, "example_input_array", None)
        return (examples,) if isinstance(examples, torch.Tensor) else examples

    def report_file(self, trainer: pl.Trainer) -> Path:
        """Where the report is saved: ``report_path``, else ``<trainer.log_dir>/schedule_report.json``.

        Call it on every rank: under DDP ``trainer.log_dir`` is a collective call."""
        if self.report_path:
            return Path(self.report_path).expanduser()
        return Path(trainer.log_dir or trainer.default_root_dir) / REPORT_FILE

    def _publish(self, trainer: pl.Trainer) -> None:
        """Save the report (the run directory is known to every rank) and print it on rank 0."""
        path = self.report_file(trainer)
        if not trainer.is_global_zero:
            return
        self.report.save(path)
        if self.print_report and self.report.passes:
            from rich.console import Console

            Console().print(self.report.table())

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The report lists the specialisations made during training too (a kind of batch the
        setup variants did not cover); it is saved again when there are new ones."""
        model = _find(pl_module, self.target)
        if self.report is None or model is None:
            return
        before = dict(self.report.specialisations)
        self.report.refresh_specialisations(model)
        path = self.report_file(trainer)  # on every rank: trainer.log_dir is collective under DDP
        if self.report.specialisations != before and trainer.is_global_zero:
            self.report.save(path)

    # -- verification ------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.verify or self._verified:
            return
        self._verified = True
        original, self._original = self._original, None
        if original is None:
            rank_zero_warn(f"ScheduleCallback: {self.target!r} was already scheduled when this callback started, so "
                           f"there is no unscheduled copy to verify against; skipping verification")
            return
        error: BaseException | None = None
        try:
            mesh = trainer.strategy.device_mesh if isinstance(trainer.strategy, ModelParallelStrategy) else None
            self._verify_first_batch(pl_module, original, batch, batch_idx, mesh)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after every rank has agreed
            error = exc
        # Under DDP each rank verifies its own batch: a rank that raised alone would leave the others
        # waiting in the next collective, so all ranks agree on the outcome and all of them stop.
        failed = trainer.strategy.reduce_boolean_decision(error is not None, all=False)
        if error is not None:
            raise error
        if failed:
            raise VerificationError(f"ScheduleCallback: first-batch verification of {self.target!r} failed on "
                                    f"another rank (see that rank's error); stopping this rank too")

    def _verify_first_batch(self, pl_module: pl.LightningModule, original: nn.Module, batch: Any,
                            batch_idx: int, mesh: Any = None) -> None:
        """Under a device mesh the scheduled model's state, outputs and gradients are gathered whole
        and the original's gradients averaged over the data-parallel ranks, as the sharded model's are."""
        scheduled = _find(pl_module, self.target)
        try:
            original.load_state_dict({k: whole_tensor(v) for k, v in scheduled.state_dict().items()}, strict=True)
        except RuntimeError as exc:
            raise VerificationError(f"the scheduled model's state_dict does not load into the original model "
                                    f"(a pass changed checkpoint keys): {exc}") from None
        parameter = next(scheduled.parameters(), None)
        if parameter is not None:
            original.to(parameter.device)
        wrap = lambda model: _StepRunner(pl_module, self.target, model, self.verify_fn, batch_idx)  # noqa: E731
        relative: dict[str, float | None] = {}
        with torch.random.fork_rng(devices=_devices(parameter)):
            errors = verify_schedule(original, scheduled, self.spec, (batch,), wrap=wrap,
                                     example_inputs=self._examples(pl_module), rtol=self.rtol, atol=self.atol,
                                     relative=relative, reference_grads=_averaged_over_data_parallel(mesh),
                                     bisect=mesh is None)
        rank_zero_info(self._verified_line(errors, relative, batch_idx))

    def _verified_line(self, errors: dict[str, float], relative: dict[str, float | None], batch_idx: int) -> str:
        """What a passing verification checked and by how much it passed, in one line."""
        outputs = [name for name in errors if not name.startswith("grad ")]
        grads = [name for name in errors if name.startswith("grad ")]

        def rel(name: str) -> str:
            value = relative.get(name)
            return f"{value:.2g}" if value is not None else f"abs {errors[name]:.2g}"

        parts = [f"{name} {rel(name)}" for name in outputs]
        if grads:
            worst = max(grads, key=lambda n: (relative.get(n) is not None, relative.get(n) or errors[n]))
            parts.append(f"gradients {rel(worst)} (worst: {worst[5:]})")
        applied = self.report.applied if self.report is not None else [p.name for p in self.spec.enabled]
        steps = ", ".join(applied) or "no passes"
        return (f"ScheduleCallback: first-batch verification of {self.target!r} passed on batch {batch_idx} "
                f"(schedule {steps}): {len(outputs)} output(s) and {len(grads)} parameter gradient(s) equal the "
                f"unscheduled model's within rtol={self.rtol:g}, atol={self.atol:g}; worst relative error: "
                + "; ".join(parts))

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "passes": [p.name for p in self.spec.enabled],
                "spec": self.spec.normalised()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the fingerprint was checked in ``on_load_checkpoint``."""

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            return  # weights keep the original keys under any schedule; only resuming needs the same one
        state = (checkpoint.get("callbacks") or {}).get(self.state_key)
        where = f"checkpoint {trainer.ckpt_path}" if trainer.ckpt_path else "the checkpoint"
        if state is None:
            if self.spec.enabled:
                raise CheckpointMismatchError(
                    f"{where} was saved without a schedule for {self.target!r}, but this run schedules passes "
                    f"{', '.join(p.name for p in self.spec.enabled)}; resume with the schedule it was trained "
                    f"with (or load only its weights, which fit any schedule)")
            return
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointMismatchError(
                f"{where} was saved under a different schedule for {self.target!r} "
                f"({_difference(state.get('spec') or {}, self.spec.normalised())}); its optimizer state belongs "
                f"to other parameters. Resume with the schedule it was trained with (or load only its weights, "
                f"which fit any schedule)")


# -- helpers -------------------------------------------------------------------------------------------

def _find(pl_module: nn.Module, target: str) -> nn.Module | None:
    try:
        module = pl_module.get_submodule(target)
    except AttributeError:
        return None
    return module if module is not pl_module else None


def _overrides_configure_model(pl_module: pl.LightningModule) -> bool:
    from lightning.pytorch.utilities.model_helpers import is_overridden

    return is_overridden("configure_model", pl_module)


def _averaged_over_data_parallel(mesh: Any) -> Callable[[dict], dict] | None:
    """Gradients summed over the mesh's data-parallel ranks and divided by their number (what
    FSDP2's reduce-scatter gives the sharded model), or None without such a dimension."""
    group_mesh = sub_mesh(mesh, DATA_PARALLEL)
    if group_mesh is None:
        return None
    import torch.distributed as dist

    def average(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for grad in grads.values():
            dist.all_reduce(grad, group=group_mesh.get_group())
            grad.div_(group_mesh.size())
        return grads

    return average


def _devices(parameter: torch.Tensor | None) -> list:
    return [parameter.device] if parameter is not None and parameter.device.type == "cuda" else []


def _difference(saved: dict[str, Any], current: dict[str, Any]) -> str:
    old = {p["name"]: p for p in saved.get("passes", [])}
    new = {p["name"]: p for p in current.get("passes", [])}
    parts = []
    for label, names in (("passes only in the checkpoint", [n for n in old if n not in new]),
                         ("passes only in this run", [n for n in new if n not in old]),
                         ("passes configured differently", [n for n in new if n in old and old[n] != new[n]])):
        if names:
            parts.append(f"{label}: {', '.join(names)}")
    if not parts and list(old) != list(new):
        parts.append(f"pass order differs: {', '.join(old)} vs {', '.join(new)}")
    return "; ".join(parts) or "fingerprints differ"


class _StepRunner(nn.Module):
    """Runs ``verify_fn`` with ``model`` standing in for ``pl_module.<target>``; ``model`` is its only
    child, so verification matches parameters and gradients by the model's own keys."""

    def __init__(self, pl_module: pl.LightningModule, target: str, model: nn.Module, verify_fn: StepFn,
                 batch_idx: int):
        super().__init__()
        self.model = model
        self.__dict__["_context"] = (pl_module, target, verify_fn, batch_idx)

    def forward(self, batch: Any) -> Any:
        pl_module, target, verify_fn, batch_idx = self.__dict__["_context"]
        with _standing_in(pl_module, target, self.model), _muted_logging(pl_module):
            return verify_fn(pl_module, batch, batch_idx)


@contextlib.contextmanager
def _standing_in(pl_module: nn.Module, target: str, model: nn.Module):
    parent_path, _, name = target.rpartition(".")
    parent = pl_module.get_submodule(parent_path) if parent_path else pl_module
    current = getattr(parent, name)
    setattr(parent, name, model)
    try:
        yield
    finally:
        setattr(parent, name, current)


@contextlib.contextmanager
def _muted_logging(pl_module: pl.LightningModule):
    """``self.log`` calls of a training step run for verification must not reach the loggers."""
    mute = lambda *args, **kwargs: None  # noqa: E731
    pl_module.__dict__["log"] = mute
    pl_module.__dict__["log_dict"] = mute
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)
