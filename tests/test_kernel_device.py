"""Where the kernel tests run Triton (``kernel_device``): the interpreter on CPU tensors only
where CUDA is absent; compiled kernels on CUDA tensors where it is present."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kernel_device import CHOICE, KernelDevice, apply, decide

HERE = os.path.dirname(__file__)


@pytest.mark.parametrize("env", [None, "0", "1", "true", "off"])
def test_without_cuda_the_interpreter_is_forced(env):
    assert decide(False, env) == KernelDevice("cpu", True)
    environ = {} if env is None else {"TRITON_INTERPRET": env}
    assert apply(environ, cuda_available=False) == KernelDevice("cpu", True)
    assert environ["TRITON_INTERPRET"] == "1"


@pytest.mark.parametrize("env", [None, "0", "off"])
def test_with_cuda_kernels_are_compiled_on_cuda_tensors(env):
    choice = decide(True, env)
    assert choice == KernelDevice("cuda", False) and choice.cuda
    environ = {} if env is None else {"TRITON_INTERPRET": env}
    apply(environ, cuda_available=True)
    assert environ.get("TRITON_INTERPRET") == env  # left alone


@pytest.mark.parametrize("env", ["1", "TRUE", " yes "])
def test_with_cuda_an_explicit_interpreter_request_keeps_cpu_tensors(env):
    assert decide(True, env) == KernelDevice("cpu", True)


def test_this_run_follows_the_decision():
    """The choice conftest applied is the one for this machine, and the kernels imported in
    this process are interpreted exactly when it says so."""
    from pipespec_fast.kernels.verify_attention import _verify_attention_kernel as kernel

    assert CHOICE == decide(torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET"))
    assert (type(kernel).__name__ == "InterpretedFunction") == CHOICE.interpret


def _conftest_in_a_fresh_process(cuda: bool) -> list[str]:
    """Load conftest.py the way pytest does, with CUDA faked present or absent and no
    TRITON_INTERPRET in the environment, then import a kernel and report what it became."""
    script = textwrap.dedent(f"""
        import importlib.util, sys, torch
        torch.cuda.is_available = lambda: {cuda}
        sys.path.insert(0, {HERE!r})
        spec = importlib.util.spec_from_file_location("conftest", {HERE!r} + "/conftest.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        import os, kernel_device
        from pipespec_fast.kernels.acceptance import _greedy_kernel as k
        print(kernel_device.DEVICE, os.environ.get("TRITON_INTERPRET"), type(k).__name__,
              torch.bfloat16 in kernel_device.KERNEL_DTYPES)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout.split()


def test_conftest_compiles_kernels_where_cuda_is_present():
    """Before the fix conftest set TRITON_INTERPRET=1 unconditionally: on a GPU machine the
    kernel tests ran the interpreter on CPU tensors and no compiled kernel was ever tested."""
    assert _conftest_in_a_fresh_process(cuda=True) == ["cuda", "None", "JITFunction", "True"]


def test_conftest_interprets_where_cuda_is_absent():
    got = _conftest_in_a_fresh_process(cuda=False)
    assert got == ["cpu", "1", "InterpretedFunction", "False"]
