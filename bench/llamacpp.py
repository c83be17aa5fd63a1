"""Native llama.cpp as a peer system of ``bench/e2e.py``: the CPU runtime a user of this GGUF
would otherwise pick, run as its own command-line tools on the same GGUF and prompts.

Two systems, each call one subprocess (the binaries ``scripts/build_llamacpp.sh`` builds):
  llamacpp_ar      ``llama-completion``: plain decoding
  llamacpp_lookup  ``llama-lookup``: its prompt-lookup speculative decoding (n-gram drafts from
                   the prompt and the text so far, verified by the model in one batch)

Why the native tools and not llama-cpp-python's ``generate()``: its sampler runs in Python, 4-8x
slower than the tools, which would make the peer look worse than it is.

The prompt is the text of our chat-templated token ids (special tokens written out); the tools
parse special tokens, and ``llama-tokenize`` checks, once per prompt, that they get exactly our
ids. Escape processing is off (``--no-escape``) so a prompt's own backslashes stay as they are.
Greedy is ``--temp 0`` (argmax); sampling is pure temperature (top-k, top-p and min-p off), like
the transformers systems. ``--ignore-eos`` masks the end-of-text token, so the tool always makes
the token budget; ours does not mask it (it just does not stop there), so greedy agreement with
ours is counted up to our first end-of-text token (:func:`agreement`).

The figures are the tools' own: ``llama-completion`` prints llama.cpp's performance counters
(prompt eval: the batched prefill; eval: one-token decode steps; total: the generation after
warm-up, as our ``seconds``); ``llama-lookup`` prints its own encode and decode wall times.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "scripts" / "build_llamacpp.sh"
SYSTEMS = ("llamacpp_ar", "llamacpp_lookup")
THREADS = 2  # the peer set-up: 2 threads, the cores of this project's machine
DRAFT_MAX = 3  # llama-lookup's default draft length (common_params_speculative_draft.n_max)
CTX = 2048  # context positions, as our preallocated KV caches


def has_amx(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo``'s text lists Intel AMX (``amx_int8``: Sapphire Rapids on)."""
    return any(line.startswith("flags") and "amx_int8" in line.split()
               for line in cpuinfo.splitlines())


def _repack_args() -> list[str]:
    """``--no-repack`` on a CPU with AMX: there the tools repack the Q4_1 weights for ggml's
    AMX matmul, which crashed (SIGSEGV in ``ggml_backend_amx_mul_mat``, a 2-core Xeon VM, this
    version); without repacking they run their AVX-512 VNNI kernels on the GGUF's layout.
    Nothing elsewhere: on other CPUs the tools run as built."""
    try:
        return ["--no-repack"] if has_amx(Path("/proc/cpuinfo").read_text()) else []
    except OSError:
        return []


REPACK_ARGS = _repack_args()


def find_binaries(cache_dir: Path) -> Path | None:
    """The folder of a finished build for this version and CPU (the build script's own check,
    so the two never disagree), or ``None`` when there is none."""
    r = subprocess.run(["bash", str(BUILD_SCRIPT), "--cache", str(cache_dir), "--where"],
                       capture_output=True, text=True, check=False)
    return Path(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else None


def _common_args(gguf: Path, prompt: str, max_new: int, temperature: float, seed: int | None,
                 threads: int, ctx: int) -> list[str]:
    sampling = ["--temp", "0"] if temperature == 0 else [
        "--temp", repr(float(temperature)), "--top-k", "0", "--top-p", "1", "--min-p", "0"]
    return ["-m", str(gguf), "-p", prompt, "--no-escape", "-n", str(max_new), "--ignore-eos",
            "-t", str(threads), "-tb", str(threads), "-c", str(ctx),
            "-s", str(-1 if seed is None else seed),  # (-1: llama.cpp's random seed)
            *sampling, *REPACK_ARGS]


def completion_command(bin_dir: Path, gguf: Path, prompt: str, max_new: int,
                       temperature: float = 0.0, seed: int | None = 0, threads: int = THREADS,
                       ctx: int = CTX) -> list[str]:
    """``llama-completion`` generating ``max_new`` tokens after ``prompt``: no chat mode (the
    prompt is already templated), only the new text on stdout."""
    return [str(bin_dir / "llama-completion"),
            *_common_args(gguf, prompt, max_new, temperature, seed, threads, ctx),
            "-no-cnv", "--no-display-prompt", "--simple-io"]


def lookup_command(bin_dir: Path, gguf: Path, prompt: str, max_new: int,
                   temperature: float = 0.0, seed: int | None = 0, threads: int = THREADS,
                   ctx: int = CTX, draft_max: int = DRAFT_MAX) -> list[str]:
    """``llama-lookup`` with drafts of at most ``draft_max`` tokens. It stops once it has more
    than ``max_new`` tokens, so it can make up to ``draft_max`` + 1 extra ones."""
    return [str(bin_dir / "llama-lookup"),
            *_common_args(gguf, prompt, max_new, temperature, seed, threads, ctx),
            "--spec-draft-n-max", str(draft_max)]


def tokenize_command(bin_dir: Path, gguf: Path, prompt: str) -> list[str]:
    """``llama-tokenize`` printing the ids the tools make of ``prompt`` (BOS as the model
    asks, special tokens parsed: the tools' own prompt tokenisation)."""
    return [str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-p", prompt, "--no-escape",
            "--ids", "--log-disable"]


def parse_ids(stdout: str) -> list[int]:
    """The ``[1, 2, 3]`` line ``llama-tokenize --ids`` prints."""
    m = re.search(r"^\[([\d,\s]*)\]\s*$", stdout, re.M)
    if m is None:
        raise ValueError(f"no id list in llama-tokenize output: {stdout[-200:]!r}")
    return [int(x) for x in m.group(1).split(",") if x.strip()]


_NUM = r"([0-9.]+|nan|inf|-nan)"


def _find(pattern: str, text: str, what: str) -> re.Match:
    m = re.search(pattern, text)
    if m is None:
        raise ValueError(f"no {what} line in llama.cpp's output (format changed?)")
    return m


def parse_completion(stdout: str, stderr: str) -> dict:
    """Figures from ``llama-completion``'s performance counters (stderr) and its text (stdout:
    the new text, then two newlines)."""
    pre = _find(rf"prompt eval time =\s*{_NUM} ms /\s*(\d+) tokens", stderr, "prompt eval")
    dec = _find(rf"(?<!prompt )eval time =\s*{_NUM} ms /\s*(\d+) runs", stderr, "eval")
    tot = _find(rf"total time =\s*{_NUM} ms /\s*(\d+) tokens", stderr, "total time")
    prefill_ms, n_prompt = float(pre.group(1)), int(pre.group(2))
    decode_ms, n_runs = float(dec.group(1)), int(dec.group(2))
    return {"text": _strip(stdout, "", "\n\n"), "prompt_tokens": n_prompt,
            # the first new token comes from the prefill's logits, one token per eval run after
            "tokens": n_runs + 1, "seconds": float(tot.group(1)) / 1e3,
            "prefill_s": prefill_ms / 1e3, "prefill_tokens_per_s": _rate(n_prompt, prefill_ms),
            "decode_s": decode_ms / 1e3, "decode_tokens_per_s": _rate(n_runs, decode_ms)}


def parse_lookup(stdout: str, stderr: str, prompt: str) -> dict:
    """Figures from ``llama-lookup``'s own summary (stderr). Its stdout is two newlines, the
    prompt's token pieces, the new text and four newlines; its printed encode speed divides the
    final length, not the prompt's, so the rates are recomputed from the counts and seconds."""
    enc = _find(rf"encoded\s+(\d+) tokens in\s+{_NUM} seconds", stderr, "encoded")
    dec = _find(rf"decoded\s+(\d+) tokens in\s+{_NUM} seconds", stderr, "decoded")
    n_prompt, enc_s = int(enc.group(1)), float(enc.group(2))
    n_new, dec_s = int(dec.group(1)), float(dec.group(2))
    out = {"prompt_tokens": n_prompt, "tokens": n_new, "seconds": enc_s + dec_s,
           "prefill_s": enc_s, "prefill_tokens_per_s": _rate(n_prompt, enc_s * 1e3),
           "decode_s": dec_s, "decode_tokens_per_s": _rate(n_new, dec_s * 1e3)}
    for key in ("n_drafted", "n_accept"):
        m = re.search(rf"{key}\s*=\s*(\d+)", stderr)
        if m:
            out[key] = int(m.group(1))
    if out.get("n_drafted"):
        out["acceptance"] = out.get("n_accept", 0) / out["n_drafted"]
    out["text"] = _strip(stdout, "\n\n" + prompt, "\n\n\n\n")
    return out


def _strip(stdout: str, head: str, tail: str) -> str:
    """The new text between what a tool prints before it (``head``) and after it (``tail``:
    the blank lines it prints around its timings)."""
    if not stdout.startswith(head) or not stdout.endswith(tail):
        raise ValueError(f"llama.cpp's stdout is not {head[:20]!r}... text {tail!r}: "
                         f"{stdout[:40]!r}...{stdout[-20:]!r}")
    return stdout[len(head):len(stdout) - len(tail)]


def _rate(n: int, ms: float) -> float:
    return n / (ms / 1e3) if ms > 0 else float("nan")


def agreement(ours: list[int], eos_ids, text: str, decode) -> tuple[int, int]:
    """``(agreed, compared)``: how many of our leading tokens the tool's text reproduces, out
    of those before our first end-of-text token (the tool masks it, so past it the two runs
    decode different things). A prefix whose decoding ends inside a multi-byte character
    (U+FFFD) decides nothing; the next whole one does."""
    compared = next((i for i, t in enumerate(ours) if t in eos_ids), len(ours))
    agreed = 0
    for j in range(1, compared + 1):
        piece = decode(ours[:j])
        if piece.endswith("\ufffd"):
            continue
        if not text.startswith(piece):
            break
        agreed = j
    return agreed, compared


@dataclass
class Finished:
    """One finished subprocess: its output, wall time and peak resident memory."""

    stdout: str
    stderr: str
    wall_s: float
    peak_rss_mb: float


def run_tool(cmd: list[str], timeout_s: float = 600.0) -> Finished:
    """Run ``cmd`` with no input and its output in files (not pipes: the child never blocks on
    a full pipe). Its peak resident memory is its ``VmHWM``, read while it runs: the rusage
    of a child that Python spawned with vfork starts from Python's own peak."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        hwm = _PeakWatcher(p.pid)
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        finally:
            hwm.stop()
        wall = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if p.returncode != 0:
        tail = " | ".join(stderr.strip().splitlines()[-3:])
        why = f"killed after {timeout_s:g} s" if wall >= timeout_s else f"exited {p.returncode}"
        raise RuntimeError(f"{Path(cmd[0]).name} {why}: {tail}")
    return Finished(stdout, stderr, wall, hwm.peak_kb / 1024)


class _PeakWatcher:
    """Reads a process's ``VmHWM`` (its resident high-water mark) every 20 ms until stopped;
    the last value read is its peak up to then (a run's memory peaks at load and first
    forward, long before it ends)."""

    def __init__(self, pid: int, period_s: float = 0.02) -> None:
        self.peak_kb = 0
        self._path = f"/proc/{pid}/status"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(period_s,), daemon=True)
        self._thread.start()

    def _watch(self, period_s: float) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, read_hwm_kb(self._path))
            if self._done.wait(period_s):
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def read_hwm_kb(path: str) -> int:
    """``VmHWM`` in kB from a ``/proc/<pid>/status`` file, 0 once the process is gone."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class LlamaCppSystem:
    """One llama.cpp system for ``bench/e2e.py``: ``run(ids, ...)`` like the others, on the
    text of ``ids``; ``text`` in its result (not ``ids``) is what it generated."""

    def __init__(self, kind: str, bin_dir: Path, gguf: Path, tokenizer,
                 threads: int | Callable[[], int] = THREADS, draft_max: int = DRAFT_MAX) -> None:
        """``threads``: a count, or a function asked before each run (``bench/e2e.py``'s
        ``--llamacpp-threads auto``: the count our own AR would take then)."""
        if kind not in SYSTEMS:
            raise ValueError(f"kind must be one of {SYSTEMS}, got {kind!r}")
        self.kind, self.bin_dir, self.gguf = kind, Path(bin_dir), Path(gguf)
        self.tokenizer, self.threads, self.draft_max = tokenizer, threads, draft_max
        self.memory_mb = self.gguf.stat().st_size / 2**20  # the weights it holds (mmap)
        self._prompt_ids: dict[tuple[int, ...], list[int]] = {}

    def prompt_text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def tool_ids(self, ids: list[int]) -> list[int]:
        """The ids the tool makes of our prompt's text (asked once per prompt)."""
        key = tuple(ids)
        if key not in self._prompt_ids:
            cmd = tokenize_command(self.bin_dir, self.gguf, self.prompt_text(ids))
            self._prompt_ids[key] = parse_ids(run_tool(cmd).stdout)
        return self._prompt_ids[key]

    def command(self, text: str, max_new: int, temperature: float, seed: int | None,
                ctx: int, threads: int) -> list[str]:
        if self.kind == "llamacpp_ar":
            return completion_command(self.bin_dir, self.gguf, text, max_new, temperature,
                                      seed, threads, ctx)
        return lookup_command(self.bin_dir, self.gguf, text, max_new, temperature, seed,
                              threads, ctx, self.draft_max)

    def run(self, ids: list[int], max_new: int, temperature: float, seed: int | None) -> dict:
        text = self.prompt_text(ids)
        ctx = max(CTX, len(ids) + max_new + self.draft_max + 8)
        threads = self.threads() if callable(self.threads) else self.threads
        done = run_tool(self.command(text, max_new, temperature, seed, ctx, threads))
        if self.kind == "llamacpp_ar":
            r = parse_completion(done.stdout, done.stderr)
        else:
            r = parse_lookup(done.stdout, done.stderr, text)
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["wall_s"], r["peak_rss_mb"], r["threads"] = done.wall_s, done.peak_rss_mb, threads
        r["prompt_tokens_match"] = self.tool_ids(ids) == list(ids)
        return r
