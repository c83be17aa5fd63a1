"""Where the kernel tests run the Triton kernels: compiled on CUDA tensors when CUDA is present,
Triton's interpreter on CPU tensors otherwise.

Forcing ``TRITON_INTERPRET=1`` for the whole run (as the suite once did) made a GPU machine
run the "CUDA" tests in the interpreter on CPU tensors, so no compiled kernel ever ran there.
The decision is a pure function (:func:`decide`, tested both ways in
``tests/test_kernel_device.py``) applied once, by ``conftest.py``, before anything imports
Triton: the interpreter flag is read when a kernel is decorated (``csrc_triton`` imported).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class KernelDevice:
    """The outcome: the device kernel tests put their tensors on, and whether Triton
    interprets (then ``TRITON_INTERPRET`` must read ``1`` before Triton is imported)."""

    device: str
    interpret: bool

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def decide(cuda_available: bool, interpret_env: str | None) -> KernelDevice:
    """Without CUDA the interpreter is the only way to run a kernel: forced on, CPU tensors.
    With CUDA, compiled kernels on CUDA tensors, unless the user asked for the interpreter
    explicitly (``TRITON_INTERPRET=1``): then CPU tensors, because interpreted kernels take
    host memory."""
    if not cuda_available:
        return KernelDevice("cpu", True)
    asked = interpret_env is not None and interpret_env.strip().lower() in _TRUE
    return KernelDevice("cpu" if asked else "cuda", asked)


def apply(env: MutableMapping[str, str], cuda_available: bool) -> KernelDevice:
    """Decide and write the interpreter flag into ``env`` (the process environment)."""
    choice = decide(cuda_available, env.get("TRITON_INTERPRET"))
    if choice.interpret:
        env["TRITON_INTERPRET"] = "1"
    return choice


CHOICE = apply(os.environ, torch.cuda.is_available())
DEVICE = CHOICE.device
# bf16 cannot run in Triton's interpreter (numpy has no bfloat16); compiled, it must be tested.
KERNEL_DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if CHOICE.cuda else ())


def on(*tensors: torch.Tensor):
    """The tensors on the kernel device (one tensor in, one out)."""
    moved = tuple(t.to(DEVICE) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def host(x):
    """A kernel's result (a tensor or a tuple of them) back on the CPU, for comparisons."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    return tuple(host(t) for t in x)


def call(fn, *args, **kwargs):
    """``fn`` with every tensor argument on the kernel device, its result back on the CPU."""
    moved = [on(a) if isinstance(a, torch.Tensor) else a for a in args]
    return host(fn(*moved, **kwargs))
