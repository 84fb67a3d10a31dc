"""Parallelism on torch's own engine: Slapo's ``shard`` / ``sync``, a ``parallelize`` plan of
tensor-parallel styles, and FSDP2's ``fully_shard``, all over the device mesh the caller gave
``create_schedule`` (under Lightning: the strategy's ``device_mesh``), never one from a spec.

Each primitive does nothing and returns False where the mesh lacks its dimension or that
dimension has size 1, so one schedule serves one device, DDP, FSDP, TP and 2-D meshes alike.
A module torch's styles cannot shard correctly is refused with the reason, never sharded wrong.
"""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ...errors import ScheduleError, unknown
from ...registry import Registry
from .registry import register_primitive

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
        "rowwise_to_sequence": lambda: RowwiseParallel(output_layouts=Shard(1)),
        "colwise_gathered": lambda: ColwiseParallel(output_layouts=Replicate()),
        "vocab_embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
    }


def register_parallel_style(name: str, factory: Callable[[], Any]) -> None:
    PARALLEL_STYLES.register(name, factory)


for _name, _factory in _styles().items():
    register_parallel_style(_name, _factory)

SHARDABLE = (nn.Linear, nn.Embedding)
"""What torch's colwise / rowwise styles shard (sequence parallelism takes norms and dropouts)."""


def mesh_dimension(sch, dim: str) -> Any:
    """The sub-mesh named ``dim`` of the schedule's device mesh, or None when there is no mesh,
    no such dimension, or it has size 1."""
    mesh = sch.device_mesh
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
        return f"no device mesh (one process or DDP): no {dim!r} dimension to distribute over"
    return f"the device mesh {tuple(mesh.mesh_dim_names or ())} has no {dim!r} dimension larger than 1"


@register_primitive("parallelize")
def parallelize(sch, plan: dict[str, str], mesh_dim: str = TENSOR_PARALLEL) -> bool:
    """Tensor-parallelise ``sch.mod`` by ``plan`` (child path or glob -> style name, e.g.
    ``{"self_attn.q_proj": "colwise", "self_attn.o_proj": "rowwise"}``) over ``mesh_dim``."""
    mesh = mesh_dimension(sch, mesh_dim)
    if mesh is None:
        return False
    from torch.distributed.tensor.parallel import parallelize_module

    styles = {}
    for pattern, style in plan.items():
        targets = sch.select(pattern) if any(c in pattern for c in "*?[") or pattern.startswith("re:") else [sch[pattern]]
        if not targets:
            raise ScheduleError(f"parallelize at {sch.path or '<root>'}: {pattern!r} matches no submodule")
        factory = PARALLEL_STYLES.get(style)
        for target in targets:
            _check_shardable(target, style)
            styles[target.path[len(sch.path) + 1:] if sch.path else target.path] = factory()
    parallelize_module(sch.mod, mesh, styles)
    return True


def _check_shardable(sch, style: str) -> None:
    module = sch.mod
    holder = sch.parent
    while holder is not None:
        if getattr(type(holder.mod), "traced_as_leaf", False):
            raise ScheduleError(f"parallelize: {sch.path} lives inside the op {type(holder.mod).__name__} at "
                                f"{holder.path}, which reads its weights directly; schedule tensor parallelism "
                                f"before that op's pass, or mark the pass unless_parallel: tensor_parallel")
        holder = holder.parent
    if style == "sequence":
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
