"""Run a plain PyTorch function through ``torch.compile`` on CUDA and eagerly everywhere else.

Elementwise chains such as bias + GELU or bias + dropout + residual + LayerNorm cost one memory
pass per op in eager mode. GPUs are bandwidth bound on such chains, and inductor turns each chain
into one generated Triton kernel (forward and backward), so on CUDA the compiled path pays. On CPU
the compile time is not won back in a training run, so CPU calls stay eager. The compiled function
is the very function that runs eagerly, so both paths compute the same thing by construction.

Inside a region that is itself being compiled the function runs as plain code, so the outer
``torch.compile`` traces and fuses it like any other PyTorch code.
"""
from __future__ import annotations

import functools
import importlib.util
import warnings
from typing import Callable

import torch


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


class CompiledOn:
    """Wraps ``fn``; calls whose first tensor lives on one of ``devices`` go through torch.compile.

    A compiler that fails (no Triton, no C++ toolchain) is reported once with a warning, and the
    call and all later ones run eagerly: slower, never wrong.
    """

    def __init__(self, fn: Callable, devices: tuple[str, ...] = ("cuda",)):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.devices = frozenset(devices)
        self._compiled: Callable | None = None
        self._failed = False

    def __call__(self, x: torch.Tensor, *args, **kwargs):
        if self._wants_compiled(x):
            try:
                return self._compiled_fn()(x, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eagerly
                self._failed = True
                warnings.warn(
                    f"torch.compile of {self.fn.__qualname__} failed on {x.device.type} "
                    f"({type(exc).__name__}: {exc}); running it eagerly from now on",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return self.fn(x, *args, **kwargs)

    def _wants_compiled(self, x: torch.Tensor) -> bool:
        device = x.device.type
        if self._failed or device not in self.devices or torch.compiler.is_compiling():
            return False
        return device != "cuda" or _triton_installed()

    def _compiled_fn(self) -> Callable:
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=None)
        return self._compiled


def compiled_on_cuda(fn: Callable) -> CompiledOn:
    """Decorator form of :class:`CompiledOn` for the default device set (CUDA only)."""
    return CompiledOn(fn)
