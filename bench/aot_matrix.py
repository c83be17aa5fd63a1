"""Ahead-of-time compile matrix of every Triton kernel, for sm_80 and sm_90, on a CPU.

Why: the kernels are written for a GPU the project rarely has. Triton ships ``ptxas``, so the
whole compile (front end, PTX, cubin) runs without one, and ``ptxas -v`` tells what the GPU
would be handed: registers per thread, bytes spilled to local memory, and (from Triton's own
metadata) the shared memory a program needs. A kernel that spills is slow on any GPU.

How the matrix follows the code: it does not restate tile choices. It calls the real
launchers (``pipespec_fast.kernels.*``) on small CPU tensors shaped like a real model's, under
a stand-in Triton driver that names the target (``cuda``, sm_80 / sm_90) and a JIT cache hook
that records each launch's compile request (signature, constexprs, the integer and pointer
specialisations Triton's JIT derives from the arguments, launch options) and stops it there,
before anything runs. Every distinct request is one *variant*: exactly what Triton's JIT would
compile for that launch on a GPU. Variants are then compiled in worker processes, with a fresh
cache each run so ``ptxas`` really runs and its log can be read.

Axes: model head shapes (SmolLM2-135M, Llama-3-8B, Llama-3-70B), dtypes (bf16 / fp16 / fp32),
``n`` (new tokens of a verify block, or the draft tree's size) 1..64, chains and trees, a few
cache lengths, and the two forms of ``verify_attention``'s ``cache_len`` (a host int; a 0-d
device tensor, as a captured step passes it). The launchers choose the split over the KV
sequence from the GPU's SM count, which a CPU has not: the matrix answers it (``--sms``,
default 132, an H100 / H200), so the split kernel and its combine are the ones such a GPU
would compile.

Adding a kernel: write a ``launch(case)`` that calls its launcher like the engine does and add
one ``KernelCase`` row to ``KERNELS``. Usage::

    python bench/aot_matrix.py                 # the full matrix -> bench/results/aot_matrix.*
    python bench/aot_matrix.py --subset ci     # the CI subset (tests/test_aot_matrix.py)
    python bench/aot_matrix.py --check         # exit 1 on a compile error or a bf16 sm_90 spill
    python bench/aot_matrix.py --sms 108       # split counts of an A100 (default: 132 SMs)

Must run without ``TRITON_INTERPRET`` (kernels must be ``JITFunction``s, not interpreted).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

# Triton 3.9 warns when this is unset and keeps fusion on; fusion is what the launchers get
# today (the stochastic kernel turns it off itself), so keep it and stay quiet.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from pipespec_fast import reference  # noqa: E402
from pipespec_fast.kernels import acceptance, kv_rollback  # noqa: E402
from pipespec_fast.kernels import verify_attention as verify  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Model:
    """The shapes of a model that reach a kernel."""

    n_heads: int
    kv_heads: int
    head_dim: int
    vocab: int


MODELS = {
    "smollm2_135m": Model(9, 3, 64, 49152),
    "llama3_8b": Model(32, 8, 128, 128256),
    "llama3_70b": Model(64, 8, 128, 128256),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ARCHS = (80, 90)
NS = tuple(range(1, 65))
FORMS = ("chain", "tree")
# Cached tokens before the block. The launchers no longer let Triton specialise on it, but the
# split path depends on it: a host int up to MIN_SPLIT_KEYS (1, 100) runs the unsplit kernel,
# a longer one (4096, 32768) the split kernel and its combine.
CONTEXTS = (1, 100, 4096, 32768)
# verify_attention's cache_len: a host int (eager steps) or a 0-d int32 device tensor (captured
# steps: the split count then comes from the cache's size alone).
LENGTHS = ("int", "tensor")
# Streaming multiprocessors the split rule is given (verify_attention.kv_splits): H100 / H200.
SMS = 132
# Slots of a stage's KV cache (KVCache.max_len: the model's context length, 8192 for SmolLM2 and
# Llama-3), more when the context asks for it. The split count is capped by max_len / 256.
CACHE_SLOTS = 8192


@dataclass(frozen=True)
class Case:
    """One launch of the matrix: what a launcher is given."""

    model: str
    dtype: str
    n: int
    form: str
    context: int
    length: str = "int"

    @property
    def shape(self) -> Model:
        return MODELS[self.model]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# ----------------------------------------------------------------------------- launches


def _parents(case: Case) -> torch.Tensor:
    """A chain's parents as the chain path makes them (int32), a tree's as ``DraftTree`` does
    (int64, a binary-ish tree: node i hangs under (i - 1) // 2)."""
    if case.form == "chain":
        return reference.chain_parents(case.n)
    return torch.tensor([(i - 1) // 2 if i else -1 for i in range(case.n)], dtype=torch.int64)


@functools.cache
def _bits(form: str, n: int) -> torch.Tensor:
    """Ancestor bits as the model builds them (``models/llama.py``), cached: a tree's take
    ~60 ms to build on the CPU and the matrix asks for each one thousands of times."""
    if form == "chain":
        return reference.chain_ancestor_bits(n)
    return reference.ancestor_bits(_parents(Case("", "", n, form, 0)))


def cache_slots(case: Case) -> int:
    """``max_len`` of the case's KV cache: the model's context length, or the case's context
    plus a verify block rounded up to 256 slots where that is longer."""
    return max(CACHE_SLOTS, (case.context + 64 + 255) // 256 * 256)


def launch_verify_attention(case: Case) -> None:
    """As ``models/llama.py`` calls it: q/k after RoPE (contiguous), v a view of the fused
    QKV output, one layer's cache ``[kv_heads, max_len, head_dim]`` (untouched memory), the
    length a host int (an eager step) or a 0-d int32 tensor (a captured step,
    ``verify_attention_static``). The launcher picks the split count itself (SM count from
    :func:`sm_count_as`)."""
    m, n, dt = case.shape, case.n, case.torch_dtype
    q_out, kv_out = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    qkv = torch.empty(n, q_out + 2 * kv_out, dtype=dt)
    q = torch.empty(n, m.n_heads, m.head_dim, dtype=dt)
    k = torch.empty(n, m.kv_heads, m.head_dim, dtype=dt)
    v = qkv[:, q_out + kv_out:].view(n, m.kv_heads, m.head_dim)
    max_len = cache_slots(case)
    k_cache = torch.empty(m.kv_heads, max_len, m.head_dim, dtype=dt)
    v_cache = torch.empty(m.kv_heads, max_len, m.head_dim, dtype=dt)
    length = case.context
    if case.length == "tensor":
        length = torch.tensor(case.context, dtype=torch.int32)
    verify.verify_attention(q, k, v, k_cache, v_cache, length, _bits(case.form, n))


def launch_kv_compact(case: Case) -> None:
    """A tree's accepted path of ``n`` nodes moved down to ``context`` (``KVCache.keep_path``:
    int64 sources, the whole ``[layers, kv_heads, max_len, head_dim]`` cache)."""
    m, n = case.shape, case.n
    max_len = (case.context + 64 + 255) // 256 * 256
    k = torch.empty(2, m.kv_heads, max_len, m.head_dim, dtype=case.torch_dtype)
    v = torch.empty_like(k)
    src = case.context + torch.arange(n, dtype=torch.int64)
    kv_rollback.kv_compact(k, v, src, case.context)


def launch_greedy_accept(case: Case) -> None:
    """Token ids int64 (from ``argmax``), ``n + 1`` target rows."""
    n = case.n
    drafts = torch.zeros(n, dtype=torch.int64)
    acceptance.greedy_accept(drafts, _parents(case), torch.zeros(n + 1, dtype=torch.int64))


def launch_stochastic_accept(case: Case) -> None:
    """Probabilities are fp32 whatever the model's dtype (``logits.float()`` in the model).
    Four launches (row sums, walk, race over chunks, merge), each its own variants."""
    n, vocab = case.n, case.shape.vocab
    drafts = torch.zeros(n, dtype=torch.int64)
    q = torch.empty(n, vocab, dtype=torch.float32)
    p = torch.empty(n + 1, vocab, dtype=torch.float32)
    acceptance.stochastic_accept(drafts, _parents(case), q, p, seed=0, offset=0)


@dataclass(frozen=True)
class KernelCase:
    """One row of the matrix: a launcher and the axes that can change what it compiles."""

    name: str
    launch: Callable[[Case], None]
    contexts: tuple = CONTEXTS
    forms: tuple = FORMS
    lengths: tuple = ("int",)


# One row per launcher. A launcher that starts several kernels (the split attention and its
# combine; the four stochastic passes) is one row: each kernel it launches is recorded as its
# own variants.
KERNELS = (
    KernelCase("verify_attention", launch_verify_attention, lengths=LENGTHS),
    KernelCase("kv_compact", launch_kv_compact, forms=("tree",)),
    KernelCase("greedy_accept", launch_greedy_accept, contexts=(4096,)),
    KernelCase("stochastic_accept", launch_stochastic_accept, contexts=(4096,)),
)


# ----------------------------------------------------------------------------- interception


class _TargetDriver:
    """Stands in for Triton's CUDA driver while launchers run: it names the target and owns no
    device. The device id is the arch, so Triton's JIT keeps one binder (and target) per arch."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return self.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)


@dataclass
class Variant:
    """One compile request as Triton's JIT would make it, and the launches that made it."""

    launcher: str
    module: str
    kernel: str
    arch: int
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    tiles: dict
    spec: str
    uses: list = field(default_factory=list)
    result: dict = field(default_factory=dict)

    @property
    def job(self) -> tuple:
        return (self.module, self.kernel, self.arch, self.signature, self.constants, self.attrs,
                self.options)


@contextlib.contextmanager
def sm_count_as(sms: int):
    """Inside, ``verify_attention``'s launcher sees a GPU of ``sms`` SMs (its only device
    query, ``_sm_count``, answers it instead of CUDA), so its own split rule picks the count."""
    real = verify._sm_count
    verify._sm_count = lambda device: sms
    try:
        yield
    finally:
        verify._sm_count = real


@contextlib.contextmanager
def intercepted(arch: int, on_request: Callable):
    """Inside, a Triton launch records its compile request with ``on_request(fn, key, request)``
    and returns without compiling or running anything (the hook answers "handled")."""
    if not hasattr(knobs.runtime, "jit_cache_hook"):
        raise SystemExit("aot_matrix: this Triton has no knobs.runtime.jit_cache_hook")

    def hook(*, key, fn, compile, **_):
        on_request(fn.jit_function, key, compile)
        return True

    driver.set_active(_TargetDriver(arch))
    knobs.runtime.jit_cache_hook = hook
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook = None
        driver.set_active(None)  # the real driver is looked up again on next use


def _request_options(request: dict) -> dict:
    opts = json.loads(request["specialization_data"])["options"]
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def _describe(fn, request) -> tuple[dict, str]:
    """The kernel's own constexprs (tiles, group, dtype choices), and what Triton's JIT
    specialised on the arguments: ``x=1`` (an int equal to 1 became a constant), ``x%16`` (a
    scalar divisible by 16), ``x!16`` (a pointer or stride that is not). Strides equal to 1
    (innermost dims) are left out: every launch has them; so are the arguments the kernel
    declares ``do_not_specialize`` (Triton derives nothing from them)."""
    sig, consts = request["signature"], request["constants"]
    attrs = request["configs"][0]
    tiles = {fn.arg_names[i]: consts[(i,)] for i in fn.constexprs}
    spec = []
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs or sig[name].startswith("fp") or fn.params[i].do_not_specialize:
            continue
        aligned = ["tt.divisibility", 16] in attrs.get((i,), [])
        layout = name.endswith("_ptr") or name.startswith("s_")
        if sig[name] == "constexpr":
            if not (layout and consts[(i,)] == 1):
                spec.append(f"{name}={consts[(i,)]}")
        elif aligned and not layout:
            spec.append(f"{name}%16")
        elif not aligned and layout:
            spec.append(f"{name}!16")
    return tiles, " ".join(spec)


def cases(kc: KernelCase, models, dtypes, ns):
    """The launches of one row over the axes, in a fixed order."""
    for model, dtype, n, form, context, length in itertools.product(
            models, dtypes, ns, kc.forms, kc.contexts, kc.lengths):
        yield Case(model, dtype, n, form, context, length)


def collect(kernels, archs, models, dtypes, ns, sms: int = SMS) -> list[Variant]:
    """Every distinct compile request of the launches over the axes, in first-seen order."""
    found: dict[tuple, Variant] = {}
    now: dict = {}  # the launch being made: its row and case

    def on_request(fn, key, request):
        ident = (fn.module, fn.fn.__qualname__, now["arch"], str(key))
        if ident not in found:
            found[ident] = Variant(
                now["row"], fn.module, fn.fn.__qualname__, now["arch"], request["signature"],
                dict(request["constants"]), dict(request["configs"][0]),
                _request_options(request), *_describe(fn, request))
        found[ident].uses.append(now["case"])

    for arch in archs:
        with intercepted(arch, on_request), sm_count_as(sms):
            for kc in kernels:
                for case in cases(kc, models, dtypes, ns):
                    now.update(arch=arch, row=kc.name, case=case)
                    kc.launch(case)
    return list(found.values())


# ----------------------------------------------------------------------------- compiling

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log (one entry function)."""
    used, frame = _PTXAS_USED.search(log), _PTXAS_FRAME.search(log)
    if used is None or frame is None:
        raise ValueError(f"no ptxas -v figures in the log: {log[-500:]!r}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return dict(regs=int(used.group(1)), stack=stack, spill_stores=stores, spill_loads=loads)


def _worker_init(cache_dir: str) -> None:
    knobs.cache.dir = cache_dir  # fresh: every compile runs ptxas, whose log we read
    knobs.nvidia.dump_ptxas_log = True


def compile_job(job: tuple) -> dict:
    """Compile one variant to a cubin; its ptxas figures and Triton's shared memory."""
    import importlib

    from triton.compiler import ASTSource

    module, kernel, arch, signature, constants, attrs, options = job
    fn = getattr(importlib.import_module(module), kernel)
    log = io.StringIO()
    start, cpu = time.perf_counter(), _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            out = triton.compile(ASTSource(fn, signature, constants, attrs),
                                 target=GPUTarget("cuda", arch, 32), options=options)
        figures = parse_ptxas(log.getvalue())
    except Exception as exc:  # a compile error is a result of the matrix, not a crash
        return dict(error=f"{type(exc).__name__}: {str(exc)[-1500:]}",
                    seconds=round(time.perf_counter() - start, 2))
    return dict(figures, shared=int(out.metadata.shared), num_warps=out.metadata.num_warps,
                seconds=round(time.perf_counter() - start, 2),
                cpu_s=round(_cpu_seconds() - cpu, 2))


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as one): the cost of a
    compile whatever else shares the machine."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def compile_all(variants: list[Variant], jobs: int) -> None:
    """Fill each variant's ``result``, ``jobs`` compiles at a time (spawned workers)."""
    import multiprocessing

    with tempfile.TemporaryDirectory(prefix="aot-matrix-") as cache:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init,
                                 initargs=(cache,)) as pool:
            for v, res in zip(variants, pool.map(compile_job, [v.job for v in variants]),
                              strict=True):
                v.result = res


# ----------------------------------------------------------------------------- reporting


def _ranges(values) -> str:
    """``1,2,3,5,7,8`` -> ``1-3,5,7-8``."""
    vals, out = sorted(set(values)), []
    for v in vals:
        if out and out[-1][1] == v - 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _names(values, order) -> str:
    present = set(values)
    return ",".join(x for x in order if x in present)


def row(v: Variant) -> dict:
    """A variant as one JSON record."""
    uses = v.uses
    return dict(
        launcher=v.launcher, kernel=v.kernel, arch=f"sm_{v.arch}",
        models=_names((u.model for u in uses), MODELS), dtypes=_names((u.dtype for u in uses),
                                                                      DTYPES),
        n=_ranges(u.n for u in uses), forms=_names((u.form for u in uses), FORMS),
        contexts=",".join(str(c) for c in sorted({u.context for u in uses})),
        lengths=_names((u.length for u in uses), LENGTHS),
        tiles=" ".join(f"{k}={val}" for k, val in v.tiles.items()), spec=v.spec,
        **{"num_warps": v.options.get("num_warps"), **v.result})


def failures(rows: list[dict]) -> list[str]:
    """What the matrix must not show: a compile error anywhere, or a spill in a variant that a
    bf16 model launches on sm_90."""
    bad = []
    for r in rows:
        what = f"{r['kernel']} {r['arch']} {r['models']} {r['dtypes']} n={r['n']} {r['tiles']}"
        if "error" in r:
            bad.append(f"compile error: {what}: {r['error'][:300]}")
        elif r["arch"] == "sm_90" and "bf16" in r["dtypes"].split(",") and (
                r["spill_stores"] or r["spill_loads"]):
            bad.append(f"bf16 sm_90 spills {r['spill_stores']}/{r['spill_loads']} B: {what}")
    return bad


def summary(rows: list[dict]) -> list[dict]:
    """Variants grouped by kernel, arch, model, dtype and tiles: the specialisations of one
    tile choice are folded into one line (their figures as ranges / maxima)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" in r:
            continue
        key = (r["kernel"], r["arch"], r["models"], r["dtypes"], r["tiles"], r["num_warps"])
        groups.setdefault(key, []).append(r)
    out = []
    for (kernel, arch, models, dtypes, tiles, warps), rs in groups.items():
        regs = sorted({r["regs"] for r in rs})
        ns = ",".join(r["n"] for r in rs).split(",")
        out.append(dict(
            kernel=kernel, arch=arch, models=models, dtypes=dtypes, tiles=tiles, warps=warps,
            n=_ranges(x for part in ns for x in _expand(part)), variants=len(rs),
            regs=str(regs[0]) if len(regs) == 1 else f"{regs[0]}-{regs[-1]}",
            spill_stores=max(r["spill_stores"] for r in rs),
            spill_loads=max(r["spill_loads"] for r in rs),
            shared=max(r["shared"] for r in rs)))
    return out


def _expand(part: str) -> range:
    a, _, b = part.partition("-")
    return range(int(a), int(b or a) + 1)


def _cell(s: dict) -> str:
    spill = max(s["spill_stores"], s["spill_loads"])
    return f"{s['regs']} / {_bytes(s['shared'])}" + (f" / **spill {_bytes(spill)}**"
                                                    if spill else "")


def _bytes(n: int) -> str:
    return f"{n / 1024:.1f}K".replace(".0K", "K") if n >= 1024 else f"{n}B"


def pivot(summary_rows: list[dict]) -> list[str]:
    """The docs table: one row per kernel, model and tile choice, one column per arch and
    dtype; a cell is ``registers / shared memory per program`` (and the larger spill, if any),
    over the specialisations of that tile. Tiles show the block sizes only: the model sets
    the rest (group, head dim) and the dtype the dot precision."""
    cols = [(a, d) for a in ("sm_80", "sm_90") for d in DTYPES]
    rows: dict[tuple, dict] = {}
    for s in summary_rows:
        key = (s["kernel"], s["models"], _short(s["tiles"]), s["warps"])
        r = rows.setdefault(key, {"n": set()})
        r["n"].update(x for part in s["n"].split(",") for x in _expand(part))
        for d in s["dtypes"].split(","):
            r[(s["arch"], d)] = _cell(s)
    head = ["kernel", "models", "n", "tiles", "warps"] + [f"{a} {d}" for a, d in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # a kernel's rows together (kernels and models in first-seen order), then by tiles
    rank = {}
    for kernel, models, _, _ in rows:
        rank.setdefault(kernel, len(rank))
        rank.setdefault(models, len(rank))
    for (kernel, models, tiles, warps), r in sorted(
            rows.items(), key=lambda kv: (rank[kv[0][0]], rank[kv[0][1]], kv[0][2])):
        cells = [kernel, models, _ranges(r["n"]), tiles, str(warps)]
        lines.append("| " + " | ".join(cells + [r.get(c, "") for c in cols]) + " |")
    return lines


def _short(tiles: str) -> str:
    """The block sizes (``BLOCK_D`` only where it is the sole one) and the switches that are
    on (``SPLIT``, ``LEN_PTR``): what tells two compiled programs of a model apart."""
    blocks = [t for t in tiles.split() if t.startswith("BLOCK")]
    keep = [t for t in blocks if not t.startswith("BLOCK_D=")]
    flags = [t.removesuffix("=True") for t in tiles.split() if t.endswith("=True")]
    return " ".join((keep or blocks) + flags)


def markdown(report: dict) -> str:
    """The summary table (docs/KERNELS.md) and the per-variant list."""
    cols = ("kernel", "arch", "models", "dtypes", "n", "tiles", "warps", "variants", "regs",
            "spill_stores", "spill_loads", "shared")
    lines = [f"# AOT compile matrix ({report['command']})", "",
             f"triton {report['triton']}, ptxas {report['ptxas']}; {len(report['variants'])} "
             f"variants, {report['errors']} errors, {report['wall_s']} s wall with "
             f"{report['jobs']} workers; split counts for a GPU of {report['sms']} SMs. "
             "Shared memory in bytes per program; spills in bytes.",
             "", "## Per kernel (registers / shared memory per program)", "",
             *pivot(report["summary"]),
             "", "## Per tile choice", "", "| " + " | ".join(cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(s[c]) for c in cols) + " |" for s in report["summary"]]
    vcols = ("kernel", "arch", "models", "dtypes", "n", "forms", "contexts", "lengths", "tiles",
             "spec",
             "regs", "spill_stores", "spill_loads", "stack", "shared", "seconds")
    lines += ["", "## Every variant", "", "| " + " | ".join(vcols) + " |",
              "|" + "---|" * len(vcols)]
    for r in report["variants"]:
        lines.append("| " + " | ".join(str(r.get(c, r.get("error", "")[:80])) for c in vcols)
                     + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def _ptxas_versions(archs) -> str:
    """The ptxas each arch is compiled with (Triton 3.9 uses its CUDA 13 ``ptxas-blackwell``
    from sm_90 up, the CUDA 12 one below)."""
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # an older Triton: one ptxas for every arch
        def get_ptxas(arch):
            return knobs.nvidia.ptxas
    out = []
    for arch in archs:
        text = subprocess.run([get_ptxas(arch).path, "--version"], capture_output=True,
                              text=True).stdout
        found = re.search(r"V(\d+\.\d+\.\d+)", text)
        out.append(f"sm_{arch}: {found.group(1) if found else 'unknown'}")
    return ", ".join(out)


def select(variants: list[Variant], subset: str) -> list[Variant]:
    """``full``: every variant. ``ci``: every variant a bf16 model launches on sm_90 (the
    no-spill rule's whole domain), and of the others one per tile choice (kernel, arch, model,
    dtype, constexprs): the one reaching the largest ``n``, preferring a 4096-token context
    (a long prefix: the split path where there is one); ties go to the first seen. Deterministic."""
    if subset == "full":
        return variants
    best: dict[tuple, Variant] = {}
    for v in variants:
        if _bf16_sm90(v):
            continue
        models = sorted({u.model for u in v.uses})
        dtypes = sorted({u.dtype for u in v.uses})
        key = (v.launcher, v.kernel, v.arch, tuple(models), tuple(dtypes), str(v.tiles))
        if key not in best or _weight(v) > _weight(best[key]):
            best[key] = v
    keep = {id(v) for v in best.values()}
    return [v for v in variants if _bf16_sm90(v) or id(v) in keep]


def _bf16_sm90(v: Variant) -> bool:
    return v.arch == 90 and any(u.dtype == "bf16" for u in v.uses)


def _weight(v: Variant) -> tuple[int, bool]:
    return max(u.n for u in v.uses), any(u.context == 4096 for u in v.uses)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=("full", "ci"), default="full")
    ap.add_argument("--archs", default=",".join(str(a) for a in ARCHS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--dtypes", default=",".join(DTYPES))
    ap.add_argument("--kernels", default=",".join(k.name for k in KERNELS))
    ap.add_argument("--sms", type=int, default=SMS,
                    help="SM count the launchers' split rule is given (H100 / H200: 132)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=str(RESULTS / "aot_matrix"),
                    help="writes OUT.json and OUT.md")
    ap.add_argument("--list", action="store_true", help="collect and count variants only")
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on a compile error or a bf16 sm_90 spill")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not isinstance(verify._verify_attention_kernel, triton.runtime.JITFunction):
        raise SystemExit("aot_matrix: unset TRITON_INTERPRET (kernels are interpreted)")
    kernels = [k for k in KERNELS if k.name in args.kernels.split(",")]
    start = time.perf_counter()
    variants = collect(kernels, [int(a) for a in args.archs.split(",")],
                       args.models.split(","), args.dtypes.split(","), NS, args.sms)
    launches = sum(len(v.uses) for v in variants)
    variants = select(variants, args.subset)
    print(f"[aot_matrix] {launches} launches -> {len(variants)} variants ({args.subset})",
          flush=True)
    if args.list:
        for v in variants:
            print(f"{v.kernel} sm_{v.arch} {v.tiles} {v.spec}")
        return 0
    compile_all(variants, max(1, args.jobs))
    rows = [row(v) for v in variants]
    command = "python bench/aot_matrix.py" + (" --subset ci" if args.subset == "ci" else "") + (
        f" --sms {args.sms}" if args.sms != SMS else "")
    report = dict(command=command, triton=triton.__version__, sms=args.sms,
                  ptxas=_ptxas_versions(int(a) for a in args.archs.split(",")),
                  subset=args.subset, jobs=args.jobs, launches=launches,
                  wall_s=round(time.perf_counter() - start, 1),
                  errors=sum("error" in r for r in rows), summary=summary(rows), variants=rows)
    bad = failures(rows)
    report["failures"] = bad
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(f"[aot_matrix] {len(rows)} compiled, {report['errors']} errors, {len(bad)} failures, "
          f"{report['wall_s']} s -> {out}.json/.md")
    for line in bad:
        print("[aot_matrix] FAIL", line)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
