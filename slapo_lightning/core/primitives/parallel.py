"""Parallelism on torch's own engine: Slapo's ``shard`` / ``sync``, a ``parallelize`` plan of
tensor-parallel styles, and FSDP2's ``fully_shard``, all over the device mesh the caller gave
``create_schedule`` (under Lightning: the strategy's ``device_mesh``), never one from a spec.

Each primitive does nothing and returns False where the mesh lacks its dimension or that
dimension has size 1, so one schedule serves one device, DDP, FSDP, TP and 2-D meshes alike.
A module torch's styles cannot shard correctly is refused with the reason, never sharded wrong.
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Any, Callable

from torch import nn

from ...errors import NoMatch, ScheduleError, unknown
from ...registry import Registry
from .registry import register_primitive

log = logging.getLogger("slapo_lightning")

TENSOR_PARALLEL = "tensor_parallel"
DATA_PARALLEL = "data_parallel"

PARALLEL_STYLES: Registry = Registry("parallel style")
"""Name -> factory of a torch ``ParallelStyle`` (``plan`` values of ``parallelize``)."""


def _styles():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    return {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "sequence": SequenceParallel,
        "colwise_from_sequence": lambda: ColwiseParallel(input_layouts=Shard(1)),
        # sequence-sharded activations stay DTensors: Hugging Face code reads the sequence length
        # off them (positions, masks), which must be the whole one
        "rowwise_to_sequence": lambda: RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        "colwise_gathered": lambda: ColwiseParallel(output_layouts=Replicate()),
        "colwise_from_sequence_gathered": lambda: ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
        "vocab_embedding_to_sequence": lambda: RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                               use_local_output=False),
    }


SEQUENCE_STYLES = {"sequence", "colwise_from_sequence", "rowwise_to_sequence", "colwise_from_sequence_gathered",
                   "vocab_embedding_to_sequence"}
"""Styles that change what the module takes or gives (activations sharded along the sequence):
a module sharded with them cannot be checked alone on its recorded (whole) input."""


def register_parallel_style(name: str, factory: Callable[[], Any], changes_layout: bool = False) -> None:
    PARALLEL_STYLES.register(name, factory)
    if changes_layout:
        SEQUENCE_STYLES.add(name)


for _name, _factory in _styles().items():
    register_parallel_style(_name, _factory)

SHARDABLE = (nn.Linear, nn.Embedding)
"""What torch's colwise / rowwise styles shard (sequence parallelism takes norms and dropouts)."""


def mesh_dimension(sch, dim: str) -> Any:
    """The sub-mesh named ``dim`` of the schedule's device mesh (see :func:`sub_mesh`)."""
    return sub_mesh(sch.device_mesh, dim)


def sub_mesh(mesh: Any, dim: str) -> Any:
    """The sub-mesh named ``dim`` of ``mesh``, or None when there is no mesh, no such dimension,
    or it has size 1."""
    if mesh is None:
        return None
    names = tuple(mesh.mesh_dim_names or ())
    if dim not in names:
        return None
    sub = mesh[dim] if len(names) > 1 else mesh
    return sub if sub.size() > 1 else None


def why_not_applicable(sch, dim: str) -> str | None:
    """Why a parallel step does nothing here (for reports), None when it applies."""
    if mesh_dimension(sch, dim) is not None:
        return None
    mesh = sch.device_mesh
    if mesh is None:
        return "no device mesh (one process or DDP)"
    return f"the mesh {tuple(mesh.mesh_dim_names or ())} has no {dim!r} dimension larger than 1"


@register_primitive("parallelize")
def parallelize(sch, plan: dict[str, Any] | str, mesh_dim: str = TENSOR_PARALLEL, local_sizes: list[str] | None = None,
                check: bool = True) -> bool:
    """Tensor-parallelise ``sch.mod`` by ``plan`` (child path or glob -> style name, e.g.
    ``{"self_attn.q_proj": "colwise", "self_attn.o_proj": "rowwise"}``) over ``mesh_dim``.

    ``plan`` may instead name a plan read off the module's dataflow (``"megatron"``, see
    ``tensor_plan.py``), for one schedule over every architecture. A plan value may be
    ``{style: colwise, blocks: 3}`` for a projection whose output is ``blocks`` tensors side by
    side (GPT-2's ``c_attn``: q, k, v): each rank then holds its share of every block.
    ``local_sizes`` names integer attributes (``attn.split_size``) the module's code splits by,
    which become per-rank sizes. Transposed Linears (HF's ``Conv1D``) take the same styles.
    With ``check`` the module is run on its recorded input before and after: a sharding that
    changes its outputs is undone and the module reported as left whole (not for sequence
    parallelism, whose modules then take and give sequence shards instead).
    """
    mesh = mesh_dimension(sch, mesh_dim)
    if mesh is None:
        return False
    from .tensor_plan import TENSOR_PLANS, keep_if_same_outputs

    what = f"the {plan!r} plan" if isinstance(plan, str) else "this plan"
    groups = TENSOR_PLANS.get(plan)(sch) if isinstance(plan, str) else [plan]
    left_whole = []
    for index, group in enumerate(groups):
        shard = partial(_shard, sch, mesh, _styles_for(sch, group, mesh.size()), local_sizes if index == 0 else ())
        if not check or _styles_named(group) & SEQUENCE_STYLES:
            shard()
            continue
        try:
            keep_if_same_outputs(sch, shard, mesh, what)
        except NoMatch as exc:
            left_whole.append(f"{', '.join(group)}: {exc}")
    if left_whole and len(left_whole) == len(groups):
        raise NoMatch("; ".join(left_whole))
    for reason in left_whole:
        log.info("slapo_lightning: parallelize at %s left %s", sch.path or "<root>", reason)
    return True


def _check_parallelize_args(args: dict[str, Any]) -> list[str]:
    """Plan names and style names, checked when the spec is read (the mesh may only come later)."""
    from .tensor_plan import TENSOR_PLANS

    plan = args.get("plan")
    if isinstance(plan, str):
        return [] if plan in TENSOR_PLANS else [unknown("tensor-parallel plan", plan, TENSOR_PLANS.names(),
                                                        more="(or a mapping of child path -> style)")]
    if not isinstance(plan, dict):
        return [f"argument 'plan' must be a plan name or a mapping of child path -> style, got {plan!r}"]
    return [unknown("parallel style", style, PARALLEL_STYLES.names())
            for style in sorted(_styles_named(plan), key=str) if style not in PARALLEL_STYLES]


parallelize.check_args = _check_parallelize_args


def _styles_named(plan: dict[str, Any]) -> set[str]:
    return {entry if isinstance(entry, str) else (entry or {}).get("style") for entry in plan.values()}


def _shard(sch, mesh, styles: dict[str, Any], local_sizes) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    for name in local_sizes or ():
        _make_local(sch, name, mesh.size())
    parallelize_module(sch.mod, mesh, styles)


def _styles_for(sch, plan: dict[str, Any], ranks: int) -> dict[str, Any]:
    """torch ParallelStyles by path relative to ``sch``, from a plan's (glob) paths and style names."""
    styles = {}
    for pattern, entry in plan.items():
        style, blocks = (entry, 1) if isinstance(entry, str) else (entry.get("style"), int(entry.get("blocks", 1)))
        targets = sch.select(pattern) if any(c in pattern for c in "*?[") or pattern.startswith("re:") else [sch[pattern]]
        if not targets:
            raise ScheduleError(f"parallelize at {sch.path or '<root>'}: {pattern!r} matches no submodule")
        for target in targets:
            _check_shardable(target, style)
            relative = target.path[len(sch.path) + 1:] if sch.path else target.path
            if isinstance(target.mod, _transposed_linears()):
                styles[relative] = transposed_style(style, blocks, ranks)
            elif blocks != 1:
                raise ScheduleError(f"parallelize: {target.path}: 'blocks' is for transposed Linears (Conv1D)")
            else:
                styles[relative] = PARALLEL_STYLES.get(style)()
    return styles


def _transposed_linears() -> tuple[type, ...]:
    """Linears that store their weight as (in, out): Hugging Face's ``Conv1D`` (GPT-2)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return ()
    return (Conv1D,)


def _make_local(sch, name: str, ranks: int) -> None:
    owner_path, _, attribute = name.rpartition(".")
    owner = sch[owner_path].mod if owner_path else sch.mod
    value = getattr(owner, attribute, None)
    if not isinstance(value, int) or isinstance(value, bool) or value % ranks:
        raise ScheduleError(f"parallelize: local_sizes {name!r} at {sch.path or '<root>'} is {value!r}, not an "
                            f"integer divisible by the {ranks} tensor-parallel ranks")
    setattr(owner, attribute, value // ranks)


def transposed_style(style: str, blocks: int, ranks: int):
    """Colwise / rowwise for a transposed Linear: the same collectives as torch's styles, the
    weight sharded on the other dimension; with ``blocks``, the output columns reordered so that
    each rank's shard holds its part of every block. Checkpoints keep the original layout."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if style not in ("colwise", "rowwise"):
        raise ScheduleError(f"parallelize: a transposed Linear (Conv1D) takes 'colwise' or 'rowwise', got {style!r}")
    if style == "rowwise" and blocks != 1:
        raise ScheduleError("parallelize: 'blocks' splits a colwise projection's output, not a rowwise one's")
    base = ColwiseParallel if style == "colwise" else RowwiseParallel

    class TransposedStyle(base):
        def _partition(self, name, module, device_mesh):
            order = _block_order(module.weight.shape[1], blocks, ranks) if blocks > 1 else None
            for pname, param in list(module.named_parameters(recurse=False)):
                if order is not None:
                    param = param.detach()[:, order] if pname == "weight" else param.detach()[order]
                if style == "colwise":
                    placement = Shard(1) if pname == "weight" else Shard(0)
                else:
                    placement = Shard(0) if pname == "weight" else Replicate()
                module.register_parameter(pname, nn.Parameter(distribute_tensor(param, device_mesh, [placement])))
            if order is not None:
                _keep_original_layout(module, order)

        def _apply(self, module, device_mesh):
            from functools import partial

            from torch.distributed.tensor import distribute_module

            if style == "rowwise":  # the input arrives sharded on its last dimension, as for a Linear
                self.desired_input_layouts = (Shard(-1),)

            return distribute_module(module, device_mesh, self._partition,
                                     partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                     partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))

    return TransposedStyle()


def _block_order(width: int, blocks: int, ranks: int):
    """Column order putting rank r's slice of every block next to each other."""
    import torch

    if width % (blocks * ranks):
        raise ScheduleError(f"parallelize: {width} output columns do not split into {blocks} blocks over {ranks} ranks")
    block, share = width // blocks, width // blocks // ranks
    return torch.tensor([b * block + r * share + i for r in range(ranks) for b in range(blocks) for i in range(share)])


def _keep_original_layout(module: nn.Module, order) -> None:
    """State-dict hooks: save the columns in the original order (whole tensors), load them back
    into this rank's reordered shard."""
    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    inverse = torch.argsort(order)

    def _column(key: str) -> int:
        return 1 if key.endswith("weight") else 0

    def save(mod, state_dict, prefix, local_metadata):
        for name in ("weight", "bias"):
            key = prefix + name
            value = state_dict.get(key)
            if isinstance(value, DTensor):
                state_dict[key] = value.full_tensor().index_select(_column(key), inverse)

    def load(mod, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        for name in ("weight", "bias"):
            key, param = prefix + name, getattr(mod, name, None)
            value = state_dict.get(key)
            if value is None or not isinstance(param, DTensor):
                continue
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            state_dict[key] = distribute_tensor(whole.to(param.device).index_select(_column(key), order),
                                                param.device_mesh, param.placements)

    module.register_state_dict_post_hook(save)
    module.register_load_state_dict_pre_hook(load)


def _check_shardable(sch, style: str) -> None:
    module = sch.mod
    holder = sch.parent
    while holder is not None:
        if getattr(type(holder.mod), "traced_as_leaf", False):
            raise ScheduleError(f"parallelize: {sch.path} lives inside the op {type(holder.mod).__name__} at "
                                f"{holder.path}, which reads its weights directly; schedule tensor parallelism "
                                f"before that op's pass, or mark the pass unless_parallel: tensor_parallel")
        holder = holder.parent
    if style == "sequence" or isinstance(module, _transposed_linears()):
        return
    if not isinstance(module, SHARDABLE) or type(module) not in (nn.Linear, nn.Embedding):
        raise ScheduleError(f"parallelize: {sch.path} is a {type(module).__name__}; the {style!r} style shards "
                            f"nn.Linear and nn.Embedding only (schedule tensor parallelism before passes that "
                            f"replace Linears with fused ops)")


@register_primitive("shard")
def shard(sch, param: str, axis: int, mesh_dim: str = TENSOR_PARALLEL) -> bool:
    """Slapo's ``sch["fc1"].shard("weight", axis=0)``: a Linear's weight split along its output
    rows (axis 0, colwise) or input columns (axis 1, rowwise); its bias follows a colwise weight."""
    mesh = mesh_dimension(sch, mesh_dim)
    if mesh is None:
        return False
    module = sch.mod
    where = sch.path or "<root>"
    if type(module) is not nn.Linear:
        raise ScheduleError(f"shard: {where} is a {type(module).__name__}; shard() splits nn.Linear parameters")
    done = module.__dict__.get("_slapo_shard")
    if param == "bias":
        if done != "colwise" or axis != 0:
            raise ScheduleError(f"shard: {where}.bias goes with a colwise weight (shard 'weight' on axis 0 first, "
                                f"then 'bias' on axis 0); a rowwise Linear keeps its bias whole")
        return True
    if param != "weight" or axis not in (0, 1):
        raise ScheduleError(f"shard: {where}: shard 'weight' on axis 0 (output rows) or 1 (input columns), "
                            f"got {param!r} on axis {axis}")
    style = "colwise" if axis == 0 else "rowwise"
    if done is not None:
        if done != style:
            raise ScheduleError(f"shard: {where} is already sharded {done}")
        return True
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(module, mesh, PARALLEL_STYLES.get(style)())
    module.__dict__["_slapo_shard"] = style
    return True


SYNC_MODES = {"fwd_post": "rowwise", "bwd_post": "colwise"}
"""Slapo's sync points and the sharding whose collective DTensor performs there: the forward
all-reduce after a rowwise Linear, the backward all-reduce of a colwise Linear's input gradient."""


@register_primitive("sync")
def sync(sch, mode: str = "fwd_post", mesh_dim: str = TENSOR_PARALLEL) -> bool:
    """Slapo's ``sync``: here the collective belongs to the sharding style, so this checks that
    the module was sharded so that DTensor all-reduces at ``mode``."""
    if mesh_dimension(sch, mesh_dim) is None:
        return False
    if mode not in SYNC_MODES:
        raise ScheduleError(f"sync: {unknown('mode', mode, SYNC_MODES)}")
    done = sch.mod.__dict__.get("_slapo_shard")
    if done != SYNC_MODES[mode]:
        raise ScheduleError(f"sync(mode={mode!r}) at {sch.path or '<root>'} needs a {SYNC_MODES[mode]} sharded "
                            f"Linear there (shard its weight on axis {0 if mode == 'bwd_post' else 1}); found "
                            f"{done or 'no sharding'}")
    return True


@register_primitive("fully_shard")
def fully_shard(sch, mesh_dim: str = DATA_PARALLEL, reshard_after_forward: bool = True) -> bool:
    """FSDP2: shard ``sch.mod``'s parameters over ``mesh_dim`` (gathered for its forward and
    backward). Apply it to each layer, then to the root, as torchtitan does."""
    mesh = mesh_dimension(sch, mesh_dim)
    if mesh is None:
        return False
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    torch_fully_shard(sch.mod, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return True
