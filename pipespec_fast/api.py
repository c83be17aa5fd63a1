"""``FastPipeline``: k stages (smallest first, target last) decoding as PipeSpec, synchronous
speculative decoding or plain autoregressive decoding of the target."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipespec_fast.config import RuntimeConfig
from pipespec_fast.decoding import baselines
from pipespec_fast.decoding.sequence import SamplingParams, Sequencer, StageStats
from pipespec_fast.pipespec.worker import Emit, InlineDrafter, StageWorker
from pipespec_fast.stages import LlamaStage, Stage, is_model_free
from pipespec_fast.text import Detokenizer
from pipespec_fast.threads import CpuThreads

MODES = ("pipespec", "sync", "ar")
ERROR_WAIT_S = 2.0


class StageError(RuntimeError):
    """A stage failed during generation; ``stage`` names it, ``__cause__`` is the original."""

    def __init__(self, stage: str, exc: BaseException) -> None:
        super().__init__(f"PipeSpec stage {stage} failed: {type(exc).__name__}: {exc}")
        self.stage = stage


MAX_WINDOW = 48  # verification blocks stay below models.llama.Transformer.PACKED_MAX_BLOCK


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: dict
    stage_stats: list[StageStats] = field(default_factory=list)
    finish_reason: str = "length"


class FastPipeline:
    """Hierarchical pipelined speculative decoding over ``stages`` (target last).

    Args:
        stages: objects implementing :class:`~pipespec_fast.stages.Stage`, smallest first.
        tokenizer: a ``transformers`` tokenizer shared by every stage (optional: without it
            prompts must be token ids and results carry no text).
        mode: ``"pipespec"`` (default), ``"sync"`` or ``"ar"``; ``generate`` may override it.
        windows: per stage i > 0, the most draft tokens it verifies in one forward.
        adaptive_windows: shrink each window to what the stage's recent acceptance makes
            worth verifying (``Sequencer.window``); ``False`` always offers the full window.
        max_leads: per stage i < k-1, how many tokens it may run ahead of the stage above.
        threads: per stage, torch intra-op threads of its worker (``None``: leave as is).
        eos_token_ids: tokens that end generation (default: the tokenizer's / target config's).
        skip_level_drafts: PipeSpec with a model-free lowest stage below two or more model
            stages: the target also runs a copy of that drafter on its own sequence and
            verifies its (free) proposals whenever the model stage below has nothing usable
            ready or is not worth waiting for. Lossless either way: every draft is verified.
        config: the per-pipeline knobs (CPU threads, ``docs/CONFIGURATION.md``); default
            (``None``): the process configuration, ``pipespec_fast.config.current()``, at each
            generation.
    """

    def __init__(
        self,
        stages: Sequence[Stage],
        tokenizer=None,
        mode: str = "pipespec",
        windows: Sequence[int] | None = None,
        max_leads: Sequence[int] | None = None,
        threads: Sequence[int | None] | None = None,
        eos_token_ids: Sequence[int] | None = None,
        adaptive_windows: bool = True,
        skip_level_drafts: bool = True,
        config: RuntimeConfig | None = None,
    ) -> None:
        if config is not None and not isinstance(config, RuntimeConfig):
            raise ValueError(f"config: expected a RuntimeConfig, got {type(config).__name__}")
        self.config = config
        if not stages:
            raise ValueError("stages: at least one stage (the target) is required")
        for st in stages:
            if not isinstance(st, Stage):
                raise ValueError(f"stages: {st!r} does not implement the Stage protocol")
        target = stages[-1]
        for st in stages[:-1]:
            if st.vocab_size != target.vocab_size:
                raise ValueError(
                    f"vocab mismatch: stage {st.name!r} has vocab_size {st.vocab_size}, "
                    f"target {target.name!r} has {target.vocab_size}"
                )
        self.stages = list(stages)
        self.tokenizer = tokenizer
        self.mode = _check_mode(mode)
        k = len(stages)
        self.windows = list(windows) if windows is not None else [0] + [6] * (k - 1)
        self.max_leads = list(max_leads) if max_leads is not None else [8] * (k - 1) + [0]
        if len(self.windows) != k or any(not 1 <= w <= MAX_WINDOW for w in self.windows[1:]):
            raise ValueError(f"windows: expected {k} entries in [1, {MAX_WINDOW}] (entry 0 "
                             "unused)")
        if len(self.max_leads) != k or any(m < 1 for m in self.max_leads[:-1]):
            raise ValueError(f"max_leads: expected {k} entries >= 1 (last unused)")
        self.threads = list(threads) if threads is not None else [None] * k
        self.adaptive_windows = adaptive_windows
        self.skip_level_drafts = skip_level_drafts
        if eos_token_ids is None:
            eos = []
            if tokenizer is not None and tokenizer.eos_token_id is not None:
                eos.append(tokenizer.eos_token_id)
            cfg = getattr(getattr(target, "model", None), "config", None)
            eos += [e for e in getattr(cfg, "eos_token_ids", []) if e not in eos]
            eos_token_ids = eos
        self.eos_token_ids = set(eos_token_ids)
        self._closed = False
        self._busy = threading.Lock()
        self._active: list[StageWorker] = []
        self.last_result: GenerationResult | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        paths: Sequence[str | Path],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        devices: Sequence[str | torch.device] | None = None,
        max_len: int = 2048,
        ngram: bool = False,
        **kwargs,
    ) -> FastPipeline:
        """Load LLaMA checkpoints (HF layout), smallest first; the last path is the target.

        Every stage must share the target's tokenizer: a different vocabulary is refused with
        a ``ValueError`` that names both stages. ``ngram=True`` puts a model-free prompt-lookup
        drafter (:class:`~pipespec_fast.stages.ngram.NGramStage`) below the models as stage 0.
        """
        if not paths:
            raise ValueError("paths: at least one model directory is required")
        devices = list(devices) if devices is not None else [device] * len(paths)
        if len(devices) != len(paths):
            raise ValueError(f"devices: {len(devices)} given for {len(paths)} stages")
        tokenizers = [_load_tokenizer(p) for p in paths]
        names = [Path(p).name for p in paths]
        tok = tokenizers[-1]
        for name, t in zip(names[:-1], tokenizers[:-1], strict=True):
            if (t is None) != (tok is None) or (t is not None and t.get_vocab() != tok.get_vocab()):
                raise ValueError(
                    f"tokenizer vocab mismatch between stage {name!r} and target {names[-1]!r}: "
                    "all stages must share one tokenizer"
                )
        stages = [
            LlamaStage.from_pretrained(p, dtype=dtype, device=d, max_len=max_len, name=n)
            for p, d, n in zip(paths, devices, names, strict=True)
        ]
        if ngram:
            from pipespec_fast.stages.ngram import NGramStage

            t = stages[-1]
            stages.insert(0, NGramStage(t.vocab_size, max_len=t.max_len, device=t.device))
        return cls(stages, tokenizer=tok, **kwargs)

    @classmethod
    def from_default(cls, draft: bool = True, **kwargs) -> FastPipeline:
        """The embedded default hierarchy: an n-gram drafter below the models listed by
        ``pipespec-fast models`` (the distilled draft, then the target). ``draft=False``
        leaves the draft out: ``[n-gram -> target]``, faster on a 2-core CPU (README)."""
        from pipespec_fast.models.defaults import default_model_dirs

        kwargs.setdefault("ngram", True)
        dirs = default_model_dirs()
        return cls.from_pretrained([str(p) for p in (dirs if draft else dirs[-1:])], **kwargs)

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, **kwargs
                 ) -> GenerationResult:
        """Generate and return the result (``token_ids`` are the new tokens only)."""
        for _ in self._run(prompt, max_new_tokens, _incremental=False, **kwargs):
            pass
        return self.last_result

    def stream(self, prompt: str | list[int], max_new_tokens: int = 128, **kwargs
               ) -> Iterator[str]:
        """Yield text pieces as soon as the target has verified them."""
        if self.tokenizer is None:
            raise ValueError("stream: needs a tokenizer (load the stages with tokenizer files)")
        yield from (piece for piece in self._run(prompt, max_new_tokens, **kwargs) if piece)

    def chat_prompt(self, text: str) -> list[int]:
        """Token ids of ``text`` as one user turn with the tokenizer's chat template (plain
        encoding when the tokenizer has no template)."""
        if self.tokenizer is None:
            raise ValueError("chat_prompt: needs a tokenizer")
        if not getattr(self.tokenizer, "chat_template", None):
            return self._encode(text)
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def predict(self, result: GenerationResult | None = None):
        """The PipeSpec analytical model filled from a generation's measured figures."""
        from pipespec_fast.analysis import predict_from_stats

        result = result or self.last_result
        if result is None:
            raise ValueError("predict: run generate() first (it measures latencies and alpha)")
        return predict_from_stats(_analysis_input(result.stage_stats, self.windows))

    def close(self) -> None:
        """Stop any running workers; idempotent."""
        self._stop_workers()
        self._closed = True

    def __enter__(self) -> FastPipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer; pass token ids instead")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = [int(t) for t in prompt]
            V = self.stages[-1].vocab_size
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt: token ids {bad[:5]} outside the vocab [0, {V})")
        if not ids:
            raise ValueError("prompt: must not be empty")
        return ids

    def _run(self, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
             ignore_eos=False, stop=None, mode=None, _incremental=True) -> Iterator[str]:
        if self._closed:
            raise RuntimeError("this FastPipeline is closed")
        # one generation at a time: stages own their KV caches (checked once per call, not
        # on the hot path)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this FastPipeline is already generating (one generation at a "
                               "time per pipeline; finish or close the other stream first)")
        try:
            yield from self._run_locked(prompt, max_new_tokens, temperature, top_k, top_p,
                                        seed, ignore_eos, stop, mode, _incremental)
        finally:
            self._busy.release()

    def _run_locked(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos,
                    stop, mode, incremental) -> Iterator[str]:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        params = SamplingParams(temperature, top_k, top_p, seed)
        mode = _check_mode(mode or self.mode)
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else list(stop)
            if not all(isinstance(s, str) and s for s in stop):
                raise ValueError("stop: must be a non-empty string or a list of them")
            if self.tokenizer is None:
                raise ValueError("stop: stop strings need a tokenizer")
        ids = self._encode(prompt)
        room = min(st.max_len for st in self.stages)
        slack = sum(self.windows[1:]) + sum(self.max_leads[:-1]) + 2 * len(self.stages)
        if len(ids) >= room:
            raise ValueError(f"prompt: {len(ids)} tokens do not fit the context of {room}")
        if len(ids) + max_new_tokens + slack > room:
            raise ValueError(
                f"max_new_tokens: prompt ({len(ids)}) + {max_new_tokens} new tokens (+{slack} "
                f"speculation slack) exceed the context of {room} tokens"
            )
        stages = self.stages if mode != "ar" else self.stages[-1:]
        t0 = time.perf_counter()
        seqrs = [Sequencer(st, params, i, t0) for i, st in enumerate(stages)]
        for s in seqrs:
            s.adaptive = self.adaptive_windows
        limit = len(ids) + max_new_tokens
        new: list[int] = []
        reason = "length"
        # text is decoded as it comes only when someone reads it (stream) or stop strings
        # need it; generate() decodes once at the end (decoding is O(text) per call and would
        # take the GIL from the stage workers)
        decoder = Detokenizer(self.tokenizer, stop, incremental or bool(stop))
        self.last_result = None
        cpu_threads = CpuThreads(stages, mode, self.config)
        cpu_threads.__enter__()
        try:
            if max_new_tokens == 0:
                chunks: Iterator[list[int]] = iter(())
            elif mode == "pipespec" and len(stages) > 1:
                chunks = self._pipespec_chunks(seqrs, ids, limit, cpu_threads.stage_threads,
                                               cpu_threads.idle_stages)
            else:
                for s in seqrs:
                    s.start(ids)
                if len(seqrs) == 1:
                    chunks = baselines.autoregressive(seqrs[0], limit)
                else:
                    chunks = baselines.synchronous(seqrs, self.windows, limit)
            for chunk in chunks:
                for tok in chunk:
                    new.append(tok)
                    if tok in self.eos_token_ids and not ignore_eos:
                        reason = "eos"
                        break
                    if len(new) >= max_new_tokens:
                        break
                piece, hit = decoder.feed(new)
                yield piece  # "" too: one step per verified chunk (stream() drops empties)
                if hit:
                    reason = "stop"
                if reason != "length" or len(new) >= max_new_tokens:
                    break
        finally:
            self._stop_workers()
            cpu_threads.__exit__(None, None, None)
        elapsed = time.perf_counter() - t0
        tail = decoder.flush(new)
        if tail:
            yield tail
        if reason == "stop":
            new = decoder.kept_ids(new)
        text = decoder.text if self.tokenizer is not None else None
        st = [s.stats for s in seqrs]
        self.last_result = GenerationResult(
            token_ids=new,
            text=text,
            stats={
                "mode": mode,
                "new_tokens": len(new),
                "seconds": elapsed,
                "tokens_per_s": len(new) / elapsed if elapsed > 0 else 0.0,
                "stages": [s.as_dict() for s in st],
            },
            stage_stats=st,
            finish_reason=reason,
        )

    def _pipespec_chunks(self, seqrs: list[Sequencer], ids: list[int], limit: int,
                         matmul_threads: list[int | None],
                         idle: list[bool] | None = None) -> Iterator[list[int]]:
        stop = threading.Event()
        out: queue.SimpleQueue = queue.SimpleQueue()
        k = len(seqrs)
        # a model-free lowest stage runs inside the worker above it (nothing to overlap)
        inline = is_model_free(seqrs[0].stage)
        workers = [
            StageWorker(s, i, k, self.windows[i], self.max_leads[i], stop, out,
                        self.threads[i] or torch.get_num_threads(), matmul_threads[i],
                        idle=bool(idle and idle[i]))
            for i, s in enumerate(seqrs)
        ]
        workers[-1].limit = limit
        for lo, hi in zip(workers, workers[1:], strict=False):
            lo.above, hi.below = hi, lo
        if inline:
            drafter = InlineDrafter(seqrs[0])
            drafter.upper, workers[1].below = workers[1], drafter
            workers = workers[1:]
            clone = getattr(seqrs[0].stage, "clone", None)
            if self.skip_level_drafts and len(workers) > 1 and clone is not None:
                low = seqrs[0]
                skip = Sequencer(clone(), low.params, low.index, low.t0)
                skip.adaptive = low.adaptive
                sk = InlineDrafter(skip, own_mirror=True)
                sk.upper, workers[-1].skip = workers[-1], sk
        self._active = workers
        self._stop_event = stop
        for w in workers:
            w.start(ids)
        while True:
            try:
                msg: Emit = out.get(timeout=0.5)
            except queue.Empty:
                if not any(w.thread.is_alive() for w in workers):
                    raise RuntimeError("all PipeSpec workers exited without output") from None
                continue
            if msg.error is not None:
                raise StageError(msg.stage, msg.error) from msg.error
            yield msg.tokens

    def _stop_workers(self) -> None:
        workers, self._active = self._active, []
        if not workers:
            return
        self._stop_event.set()
        for w in workers:  # wake a worker blocked on its inbox now, not at its next poll
            w.inbox.put(None)
        for w in workers:
            w.thread.join(timeout=ERROR_WAIT_S + 30)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def _load_tokenizer(path: str | Path):
    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model",
                                          "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p))


def _analysis_input(stats: list[StageStats], windows: list[int]) -> dict:
    stages = []
    for i, s in enumerate(stats):
        ns = sorted(s.forward_latency)
        lat = {"n": ns, "s": [sorted(s.forward_latency[n])[len(s.forward_latency[n]) // 2]
                              for n in ns]}
        d = {"name": s.name, "latency": lat}
        if i:
            d.update(alpha=s.alpha, gamma=windows[i])
        stages.append(d)
    return {"stages": stages}
