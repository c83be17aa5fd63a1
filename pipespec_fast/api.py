"""``FastPipeline``: k stages (smallest first, target last) decoding as PipeSpec, synchronous
speculative decoding or plain autoregressive decoding of the target: the public API and its
argument checks. A generation's machinery lives in ``decoding/`` (every mode's per-stage state,
the two modes that run on the caller's thread) and ``pipespec/`` (the threaded pipeline)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipespec_fast import config as runtime_config
from pipespec_fast import validate
from pipespec_fast.config import RuntimeConfig
from pipespec_fast.decoding import baselines
from pipespec_fast.decoding import warm_up as warm_up_stage
from pipespec_fast.decoding.memory import PolicyMemory
from pipespec_fast.decoding.regime import Regimes
from pipespec_fast.decoding.sampling import SamplingParams
from pipespec_fast.decoding.sequence import Sequencer
from pipespec_fast.decoding.stats import StageStats, analysis_input
from pipespec_fast.errors import GenerationTimeout, PipelineClosedError, StageError
from pipespec_fast.pipespec.distributed import DistributedRun
from pipespec_fast.pipespec.placement import Placement
from pipespec_fast.pipespec.run import PipeSpecRun
from pipespec_fast.pipespec.topology import PipeSpecSettings
from pipespec_fast.stages import Stage, check_stage, check_tree_drafter, is_model_free
from pipespec_fast.stages import check_order as check_stage_order
from pipespec_fast.text import Detokenizer, Output
from pipespec_fast.threads import CpuThreads

__all__ = ["FastPipeline", "GenerationResult", "GenerationTimeout", "PipelineClosedError",
           "StageError"]

MODES = validate.MODES
EMIT_BATCH = 16  # tokens per message from a PipeSpec target to generate() (not a stream)
HUNG_JOIN_S = 2.0  # after a timeout, how long stopped workers get to finish their step
MAX_WINDOW = 48  # drafts per verify block: within the acceptance kernels' 64 nodes with slack


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str | None
    stats: dict
    stage_stats: list[StageStats] = field(default_factory=list)
    finish_reason: str = "length"


# long: the whole public API in one class a user reads (constructors, generate / stream /
# chat_prompt / predict / close, one generation at a time); the machinery is in decoding/ and
# pipespec/, the request checks below it
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
        regimes: with adaptive windows, let the target choose by measured tokens per second
            between the whole hierarchy, the n-gram drafter alone under it and no drafts, and
            carry the measurements to the next generation (``decoding/regime.py``,
            ``decoding/memory.py``); ``False``: always the whole hierarchy, each generation
            from scratch (as a distributed pipeline runs).
        max_leads: per stage i < k-1, how many tokens it may run ahead of the stage above.
        threads: per stage, torch intra-op threads of its worker (``None``: leave as is).
        eos_token_ids: tokens that end generation (default: the tokenizer's / target's).
        skip_level_drafts: with a model-free lowest stage below two or more model stages,
            the target also verifies that drafter's (free) proposals straight: in PipeSpec a
            copy of it runs on the target's own sequence, used whenever the model stage below
            has nothing usable ready or is not worth waiting for; in sync, at each step whose
            window for the model stages' drafts is 0. Lossless either way: every draft is
            verified.
        config: the per-pipeline knobs (CPU threads, ``docs/CONFIGURATION.md``); default
            (``None``): the process configuration, ``pipespec_fast.config.current()``, at each
            generation.
        check_order: refuse model stages whose declared parameter count decreases towards
            the target (stages given in the wrong order); ``False`` allows it.
        placement: this process's place in a distributed pipeline (one rank per model stage,
            ``pipespec.placement``; made by ``from_pretrained(..., distributed=True)``): then
            ``stages`` are this rank's only, and ``windows`` / ``max_leads`` cover them all.
        tree_budget: ``0`` (default): drafts are chains. ``N > 0``: a lowest stage that drafts
            trees (the n-gram drafter: every continuation of the matched suffix; a model
            drafter, ``mode="sync"`` only: its greedy chain with siblings where it is unsure,
            ``stages/model_tree.py``) proposes token trees of up to ``N`` nodes, as deep as the
            window, and the stage above it (and, in PipeSpec, the target through its
            skip-level copy) verifies each in one forward (``decoding/tree_step.py``).
            Lossless either way.
        warm_up: rehearse every kind of step on each model stage now, so that no kernel is
            compiled mid-generation (``decoding/warm_up.py``). ``None`` (default): on CUDA
            stages (once per stage), not on the CPU, which compiles nothing at run time.
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
        regimes: bool = True,
        skip_level_drafts: bool = True,
        config: RuntimeConfig | None = None,
        check_order: bool = True,
        placement: Placement | None = None,
        tree_budget: int = 0,
        warm_up: bool | None = None,
    ) -> None:
        _check_config(config)
        if warm_up is not None and not isinstance(warm_up, bool):
            raise ValueError(f"warm_up: expected True, False or None, got {warm_up!r}")
        self.config = config
        self.placement = placement
        _check_stages(stages, placement)
        if check_order and placement is None:
            check_stage_order(list(stages))
        self.stages = list(stages)
        self.tokenizer = tokenizer
        self.mode = _check_mode(mode)
        k = len(stages) if placement is None else placement.k
        self.windows = list(windows) if windows is not None else [0] + [6] * (k - 1)
        self.max_leads = list(max_leads) if max_leads is not None else [8] * (k - 1) + [0]
        if len(self.windows) != k or any(not 1 <= w <= MAX_WINDOW for w in self.windows[1:]):
            raise ValueError(f"windows: expected {k} entries in [1, {MAX_WINDOW}] (entry 0 "
                             "unused)")
        if len(self.max_leads) != k or any(m < 1 for m in self.max_leads[:-1]):
            raise ValueError(f"max_leads: expected {k} entries >= 1 (last unused)")
        self.threads = list(threads) if threads is not None else [None] * k
        self.adaptive_windows = adaptive_windows
        self.regimes = bool(regimes)
        self.skip_level_drafts = skip_level_drafts
        self.tree_budget = _check_tree_budget(tree_budget, self.stages)
        _check_tree_mode(self.mode, self.tree_budget, self.stages, "mode")
        if eos_token_ids is None:
            eos_token_ids = _default_eos(tokenizer, stages[-1], placement)
        self.eos_token_ids = set(eos_token_ids)
        self._closed = False
        self._busy = threading.Lock()
        self._active: PipeSpecRun | None = None
        self.last_result: GenerationResult | None = None
        # windows and regimes learned by past generations (decoding/memory.py)
        self._memory = PolicyMemory()
        for st in self.stages:
            if warm_up_stage.should_warm_up(st, warm_up):
                warm_up_stage.warm_up(st)

    @classmethod
    def from_pretrained(cls, paths: Sequence[str | Path], device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None,
                        devices: Sequence[str | torch.device] | None = None,
                        max_len: int = 2048, ngram: bool = False, compute: str | None = None,
                        distributed: bool = False, ngram_store: str | Path | None = None,
                        **kwargs) -> FastPipeline:
        """Load LLaMA checkpoints (HF layout), smallest first; the last path is the target. All must
        share one tokenizer; ``ngram=True`` adds an n-gram drafter as stage 0
        (:func:`pipespec_fast.loading.load_stages`), and ``ngram_store`` (a folder saved by
        ``NGramStore.save``, or a store) the target's answers it also draws on. ``dtype``
        ``None``: bf16 on CUDA, fp32 elsewhere, per stage device
        (:func:`pipespec_fast.loading.default_dtype`). ``compute`` (every model:
        ``models.packed.set_compute``): ``"exact"`` is the converted checkpoints' fp32
        arithmetic (greedy equals transformers); ``"int8"`` computes products on Q4_1 / Q8_0 weights
        with int8 activations (greedy speculative decoding equals int8 greedy AR, not transformers).
        Default (``None``): ``int8`` for a target holding Q4_1 / Q8_0 packed weights on CPU (the
        default target), else ``exact``; drafts with packed weights follow an int8 target
        (``models.packed.default_modes``). A draft in int8 mode holds its fp16 matrices as Q8_0
        blocks (``models.packed.requantize_fp16``: its proposals move, the output does not).
        ``kwargs`` go to the constructor.

        ``distributed=True``, in every process of an initialised ``torch.distributed`` group
        of one rank per model (``torchrun``): rank i loads and runs model i only, the last
        rank the target (``docs/ARCHITECTURE.md``, distributed placement); every rank must
        then call ``generate`` with the same request, and every rank's result holds the
        target's tokens (only the target's rank streams them as they are verified). A
        neighbouring rank silent for ``PIPESPEC_DIST_PEER_TIMEOUT`` seconds (3; or
        ``config.use(...replace(dist_peer_timeout=...))`` around this call) is declared
        dead: raise it across hosts and where a first forward compiles
        (``docs/CONFIGURATION.md``)."""
        from pipespec_fast.loading import default_dtype, load_stages
        from pipespec_fast.models.packed import (
            default_modes,
            release_freed_memory,
            requantize_fp16,
            set_compute,
        )

        if compute is not None:
            validate.compute(compute)
        if distributed:
            from pipespec_fast.pipespec.placement import load_local_stages

            if devices is not None:
                raise ValueError("devices: one device per rank with distributed=True; pass "
                                 "device= (each rank's own)")
            dtype = default_dtype(device) if dtype is None else dtype
            stages, tok, placement = load_local_stages(paths, device, dtype, max_len, ngram,
                                                       compute, ngram_store)
            return cls(stages, tokenizer=tok, placement=placement, **kwargs)
        stages, tok = load_stages(paths, device, dtype, devices, max_len, ngram, ngram_store)
        models = [st.model for st in stages if hasattr(getattr(st, "model", None), "compute")]
        modes = default_modes(models) if compute is None else [compute] * len(models)
        for i, (model, mode) in enumerate(zip(models, modes, strict=True)):
            if mode == "int8" and i < len(models) - 1:
                requantize_fp16(model)  # a draft: Q8_0 blocks instead of fp16 + a Q8_0 copy
            set_compute(model, mode)
        release_freed_memory()  # the loading's transient buffers, freed mid-heap (~120 MB)
        return cls(stages, tokenizer=tok, **kwargs)

    @classmethod
    def from_default(cls, draft: bool | None = None, **kwargs) -> FastPipeline:
        """The embedded default hierarchy: an n-gram drafter below the models listed by
        ``pipespec-fast models`` (the distilled draft, then the target). ``draft``: ``None``
        (the default) includes the draft on a GPU or on a CPU with at least 4 usable cores
        (``threads.default_draft_fits``: the target keeps 3 beside it), and leaves it out,
        ``[n-gram -> target]``, on fewer, where that hierarchy measured faster on 2 cores
        (``docs/BENCHMARKS.md``, "Which hierarchy by default on 2 cores"); ``True`` /
        ``False`` decide. It is also included, unless ``draft=False``, wherever the request is
        sized for it: a distributed pipeline (one rank per model), per-stage ``devices``,
        ``windows``, ``max_leads`` or ``threads``, a configuration with ``stage_threads``, and
        ``ngram=False`` (the draft is then the only drafter). Its target and draft compute in
        int8 unless ``compute="exact"`` is asked for (:meth:`from_pretrained`; the draft's
        fp16 matrices get Q8_0 copies). The n-gram drafter draws on the embedded store of the
        target's own answers (``ngram_store=None`` leaves it out)."""
        from pipespec_fast.models.defaults import (
            NGRAM_STORE_DIR,
            default_model_dirs,
            default_target_dir,
        )
        from pipespec_fast.threads import default_draft_fits

        if draft is not None and not isinstance(draft, bool):
            raise ValueError(f"draft: expected True, False or None, got {draft!r}")
        cfg = kwargs.get("config")
        _check_config(cfg)
        if draft is None:
            per_stage = ("devices", "windows", "max_leads", "threads")
            staged = (cfg if cfg is not None else runtime_config.current()).stage_threads
            draft = kwargs.get("distributed", False) or not kwargs.get("ngram", True) \
                or any(kwargs.get(k) is not None for k in per_stage) or staged is not None \
                or default_draft_fits(kwargs.get("device", "cpu"), cfg)
        kwargs.setdefault("ngram", True)
        if kwargs["ngram"]:
            kwargs.setdefault("ngram_store", NGRAM_STORE_DIR)
        dirs = default_model_dirs() if draft else [default_target_dir()]
        return cls.from_pretrained([str(p) for p in dirs], **kwargs)

    # ------------------------------------------------------------------ public API

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, **kwargs
                 ) -> GenerationResult:
        """Generate and return the result (``token_ids`` are the new tokens only).

        Keyword arguments: ``temperature`` (0: greedy), ``top_k``, ``top_p``, ``seed``,
        ``stop`` (a string or a list), ``ignore_eos``, ``mode`` (``"pipespec"``, ``"sync"``,
        ``"ar"``), ``timeout_s`` (raise :class:`GenerationTimeout` past it). Each is checked
        before any work, with a ``ValueError`` naming it. A stage producing non-finite logits
        or failing raises :class:`StageError` naming it."""
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
            return _encode(self, text)
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                 add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def predict(self, result: GenerationResult | None = None):
        """The PipeSpec analytical model filled from a generation's measured figures."""
        from pipespec_fast.analysis import predict_from_stats

        result = result or self.last_result
        if result is None:
            raise ValueError("predict: run generate() first (it measures latencies and alpha)")
        st = result.stage_stats
        return predict_from_stats(analysis_input(st, self.windows, self._overhead(result)))

    def predict_regimes(self, result: GenerationResult | None = None):
        """The analytical model per regime the target ran in under the regime bandit, combined
        by the tokens each committed (``analysis_regimes.predict_regimes``); for a generation
        without the bandit, its one regime (the whole hierarchy)."""
        from pipespec_fast.analysis_regimes import predict_regimes
        from pipespec_fast.decoding.stats import regime_inputs

        result = result or self.last_result
        if result is None:
            raise ValueError("predict_regimes: run generate() first (it measures latencies "
                             "and alpha)")
        st, o = result.stage_stats, self._overhead(result)
        inputs = regime_inputs(st, self.windows, o) if st[-1].by_arm else {
            "full": (analysis_input(st, self.windows, o), st[-1].accepted + st[-1].verify_steps)}
        return predict_regimes(inputs)

    @staticmethod
    def _overhead(result: GenerationResult) -> float:
        """The target's measured host time per step outside its forwards, in a PipeSpec
        generation (``decoding.stats.step_overhead_s``; in sync and ar that time is the other
        stages' turns, which the model already counts: 0)."""
        from pipespec_fast.decoding.stats import step_overhead_s

        if result.stats.get("mode") != "pipespec":
            return 0.0
        return step_overhead_s(result.stage_stats[-1], result.stats["seconds"])

    def forget_measurements(self) -> None:
        """Start the next generation's window policies and regime bandit from scratch (they
        otherwise continue from the last generation with the same mode and sampling
        parameters, ``docs/ARCHITECTURE.md``): after the machine's load changed, say."""
        self._memory.clear()

    def close(self) -> None:
        """Stop any running workers; idempotent. A generation running meanwhile (in another
        thread) raises :class:`PipelineClosedError`."""
        self._closed = True
        self._stop_workers()

    def __enter__(self) -> FastPipeline:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            _note_interrupt(self)  # (raised outside a generation's own loop: its printing)
        self.close()

    # ------------------------------------------------------------------ internals

    def _run(self, prompt, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None,
             ignore_eos=False, stop=None, mode=None, timeout_s=None, _incremental=True
             ) -> Iterator[str]:
        if self._closed:
            raise PipelineClosedError("this FastPipeline is closed")
        # one generation at a time: stages own their KV caches (checked once per call, not
        # on the hot path)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("this FastPipeline is already generating (one generation at a "
                               "time per pipeline; finish or close the other stream first)")
        try:
            yield from _generation(self, prompt, max_new_tokens, temperature, top_k, top_p,
                                   seed, ignore_eos, stop, mode, timeout_s, _incremental)
        finally:
            self._busy.release()

    def _stop_workers(self) -> bool:
        """Stop the running workers; returns whether every one of them ended."""
        run, self._active = self._active, None
        return run is None or not run.close()

    def _abandon_workers(self) -> None:
        """After a timeout: stop the workers, give them a moment, and close this pipeline if
        one is still stuck (its stage's cache is in use: no further generation is safe)."""
        run, self._active = self._active, None
        if run is not None and run.close(join_s=HUNG_JOIN_S):
            self._closed = True


def _check_mode(mode: str) -> str:
    return validate.mode(mode)


def _check_config(config: RuntimeConfig | None) -> None:
    """A pipeline's ``config=`` sets its own knobs (threads); a process-wide knob differing
    from the process configuration would be silently ignored, so it is refused."""
    if config is None:
        return
    if not isinstance(config, RuntimeConfig):
        raise ValueError(f"config: expected a RuntimeConfig, got {type(config).__name__}")
    current = runtime_config.current().process_fields()
    differ = [k for k, v in config.process_fields().items() if current[k] != v]
    if differ:
        raise ValueError(f"config: {', '.join(differ)} are process-wide (they choose code paths "
                         "every pipeline shares); set them with pipespec_fast.config.use(...) "
                         "or their PIPESPEC_* variables, not per pipeline")


def _check_stages(stages: Sequence[Stage], placement: Placement | None = None) -> None:
    """Every stage implements the protocol (``check_stage``) and has the target's vocab (in
    a distributed pipeline: this rank's stages, against the target's vocab gathered)."""
    if not stages:
        raise ValueError("stages: at least one stage (the target) is required")
    for i, st in enumerate(stages):
        check_stage(st, i)
    target = stages[-1]
    vocab = target.vocab_size if placement is None else placement.target_vocab
    for st in stages[:-1]:
        if st.vocab_size != vocab:
            raise ValueError(
                f"vocab mismatch: stage {st.name!r} has vocab_size {st.vocab_size}, "
                f"target {target.name!r} has {vocab}"
            )


def _check_tree_budget(budget, stages: list[Stage]) -> int:
    """A budget in range, and with trees on, a lowest stage that drafts them below one that
    verifies them."""
    budget = validate.tree_budget(budget)
    if budget and len(stages) < 2:
        raise ValueError(f"tree_budget={budget}: the lowest stage must draft trees for a "
                         "stage above it")
    if budget:
        try:
            check_tree_drafter(stages[0], 0)
        except ValueError as e:
            raise ValueError(f"tree_budget={budget}: the lowest stage must draft trees: "
                             f"{e}") from None
    if budget and not stages[1].capabilities.trees:
        raise ValueError(f"tree_budget={budget}: stage 1 {stages[1].name!r} cannot verify "
                         "trees (capabilities.trees)")
    return budget


def _check_tree_mode(mode: str, budget: int, stages: list[Stage], arg: str) -> None:
    """Trees from a model drafter are grown by the stage above it, step by step (sync); in
    PipeSpec a model drafter runs on its own thread and hands up chains."""
    if mode == "pipespec" and budget and not is_model_free(stages[0]):
        raise ValueError(f"{arg}: tree_budget={budget} with a model drafter as the lowest stage "
                         f"({stages[0].name!r}) needs mode='sync' (in PipeSpec it drafts "
                         "chains on its own thread); trees in PipeSpec come from the n-gram "
                         "drafter")


def _default_eos(tokenizer, target: Stage, placement: Placement | None = None) -> list[int]:
    """The tokenizer's eos id, then the target's declared ones (gathered from the target's
    rank in a distributed pipeline: every rank cuts the result where the target does)."""
    eos = []
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    declared = target.capabilities.eos_token_ids if placement is None else placement.target_eos
    return eos + [e for e in declared if e not in eos]


def _encode(pipe: FastPipeline, prompt: str | list[int]) -> list[int]:
    """A prompt as token ids: text through the tokenizer, ids checked against the vocab."""
    prompt = validate.prompt(prompt)
    if isinstance(prompt, str):
        if pipe.tokenizer is None:
            raise ValueError("prompt: text needs a tokenizer; pass token ids instead")
        ids = pipe.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            raise ValueError("prompt: the text encodes to no tokens")
        return ids
    validate.token_ids_in_vocab(prompt, pipe.stages[-1].vocab_size)
    return prompt


def _check_request(pipe: FastPipeline, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                   stop, mode, timeout_s) -> tuple[SamplingParams, str, list[str] | None,
                                                   list[int]]:
    """One request's arguments checked against ``pipe`` (a ``ValueError`` names the argument):
    ``(sampling parameters, mode, stop strings, prompt ids)``."""
    validate.generation(max_new_tokens, temperature, top_k, top_p, seed, stop,
                        mode if mode is not None else pipe.mode, timeout_s)
    params = SamplingParams(temperature, top_k, top_p, seed)
    mode = mode or pipe.mode
    _check_tree_mode(mode, pipe.tree_budget, pipe.stages, "mode")
    if pipe.placement is not None and mode != "pipespec":
        raise ValueError(f"mode: a distributed pipeline runs pipespec only, not {mode!r}")
    stop = validate.stop(stop)
    if stop is not None and pipe.tokenizer is None:
        raise ValueError("stop: stop strings need a tokenizer")
    ids = _encode(pipe, prompt)
    room = min(st.max_len for st in pipe.stages)
    if pipe.placement is not None:
        room = min(room, pipe.placement.max_len)
    slack = sum(max(w, pipe.tree_budget) for w in pipe.windows[1:]) + sum(pipe.max_leads[:-1]) \
        + 2 * len(pipe.windows)
    if len(ids) >= room:
        raise ValueError(f"prompt: {len(ids)} tokens do not fit the context of {room}")
    if len(ids) + max_new_tokens + slack > room:
        raise ValueError(
            f"max_new_tokens: prompt ({len(ids)}) + {max_new_tokens} new tokens (+{slack} "
            f"speculation slack) exceed the context of {room} tokens"
        )
    return params, mode, stop, ids


def _generation(pipe: FastPipeline, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                ignore_eos, stop, mode, timeout_s, incremental) -> Iterator[str]:
    """One generation, with ``pipe`` held: check the request, run the mode, yield text pieces
    (one per verified chunk, possibly empty), set ``pipe.last_result``."""
    params, mode, stop, ids = _check_request(pipe, prompt, max_new_tokens, temperature,
                                             top_k, top_p, seed, stop, mode, timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    stages = pipe.stages if mode != "ar" else pipe.stages[-1:]
    t0 = time.perf_counter()
    index = list(range(len(stages))) if pipe.placement is None else pipe.placement.indices(
        stages)
    seqrs = [Sequencer(st, params, i, t0, adaptive=pipe.adaptive_windows,
                       reproducible=mode != "pipespec", keep_rows=i < len(pipe.windows) - 1,
                       free_drafts=pipe.placement is None and j > 0
                       and is_model_free(stages[j - 1]))
             for j, (i, st) in enumerate(zip(index, stages, strict=True))]
    memory_key = _attach_memory(pipe, seqrs, mode, stages)
    # text is decoded as it comes only when someone reads it (stream) or stop strings
    # need it; generate() decodes once at the end (decoding is O(text) per call and would
    # take the GIL from the stage workers)
    out = Output(Detokenizer(pipe.tokenizer, stop, incremental or bool(stop)),
                 max_new_tokens, set() if ignore_eos else pipe.eos_token_ids)
    pipe.last_result = None
    cpu_threads = CpuThreads(stages, mode, pipe.config)
    cpu_threads.__enter__()
    try:
        # generate() without stop strings reads the tokens only at the end: PipeSpec's target
        # then sends them in batches (at eos at once), not waking this thread at every step
        emit_every = 1 if incremental or stop else EMIT_BATCH
        chunks, pipe._active = _verified_chunks(pipe, mode, seqrs, ids,
                                                len(ids) + max_new_tokens, cpu_threads,
                                                deadline, emit_every, out.eos_ids)
        for chunk in chunks:
            # "" too: one step per verified chunk (stream() drops the empty pieces)
            yield out.feed(chunk)
            if out.done:
                break
            _check_running(pipe, deadline)
        if isinstance(pipe._active, DistributedRun):
            pipe._active.set_final(out.ids)  # sent down with the end of the generation
    except GenerationTimeout:
        pipe._abandon_workers()
        raise
    except KeyboardInterrupt:
        _note_interrupt(pipe)
        raise
    finally:
        ended = pipe._stop_workers()
        cpu_threads.__exit__(None, None, None)
    elapsed = time.perf_counter() - t0
    if ended:
        pipe._memory.keep(memory_key, seqrs)
    else:  # a worker still running goes on changing these objects: forget them
        pipe._memory.forget(memory_key)
    tail = out.finish()
    if tail:
        yield tail
    pipe.last_result = _result(out, mode, elapsed, [s.stats for s in seqrs],
                               pipe.tokenizer is not None, seqrs[-1].regimes)


def _attach_memory(pipe: FastPipeline, seqrs: list[Sequencer], mode: str,
                   stages: list[Stage]) -> tuple | None:
    """Past generations' measurements and regime bandit for this one
    (``PolicyMemory.attach``); the key to keep them under, ``None`` when nothing is carried
    (a distributed pipeline, ``regimes=False``)."""
    if pipe.placement is not None or not pipe.regimes:
        return None
    skip = pipe.skip_level_drafts and stages[0].capabilities.clone
    return pipe._memory.attach(seqrs, mode, [is_model_free(st) for st in stages], skip,
                               pipe.tree_budget, (tuple(pipe.windows), tuple(pipe.max_leads)))


def _note_interrupt(pipe: FastPipeline) -> None:
    """A KeyboardInterrupt stops this generation: in a distributed pipeline the other ranks
    are told so (they raise naming this rank as interrupted)."""
    if isinstance(pipe._active, DistributedRun):
        pipe._active.interrupted()


def _check_running(pipe: FastPipeline, deadline: float | None) -> None:
    """Between two verified chunks: the pipeline was not closed meanwhile (from another
    thread), and the deadline has not passed (``sync``/``ar`` run on the caller's thread, so
    a step in progress finishes first; PipeSpec's output loop also waits with the deadline)."""
    if pipe._closed:
        raise PipelineClosedError("the pipeline was closed during this generation")
    if deadline is not None and time.monotonic() > deadline:
        raise GenerationTimeout("the generation ran past its timeout_s")


def _verified_chunks(pipe: FastPipeline, mode: str, seqrs: list[Sequencer], ids: list[int],
                     limit: int, cpu_threads: CpuThreads, deadline: float | None = None,
                     emit_every: int = 1, stop_ids=frozenset()
                     ) -> tuple[Iterator[list[int]], PipeSpecRun | None]:
    """The mode's lists of newly verified target tokens until the target holds ``limit``
    tokens, and the PipeSpec run producing them, if any (it goes on until closed);
    ``emit_every`` / ``stop_ids``: how often a PipeSpec target sends its tokens
    (``TargetWorker.emit_every``)."""
    if limit == len(ids):
        return iter(()), None
    settings = PipeSpecSettings(tuple(pipe.windows), tuple(pipe.max_leads), tuple(pipe.threads),
                                pipe.skip_level_drafts, pipe.tree_budget)
    if pipe.placement is not None:
        run = DistributedRun(seqrs, pipe.placement, settings, limit,
                             cpu_threads.stage_threads, cpu_threads.idle_stages)
        return run.tokens(ids, deadline), run
    if mode == "pipespec" and len(seqrs) > 1:
        run = PipeSpecRun(seqrs, settings, limit, cpu_threads.stage_threads,
                          cpu_threads.idle_stages, emit_every, frozenset(stop_ids))
        return run.tokens(ids, deadline), run
    for s in seqrs:  # the stages below prefill when first used (never, if left out)
        s.start(ids, prefill=s is seqrs[-1])
    if len(seqrs) == 1:
        return baselines.autoregressive(seqrs[0], limit), None
    return baselines.synchronous(seqrs, pipe.windows, limit, pipe.tree_budget,
                                 pipe.skip_level_drafts), None


def _result(out: Output, mode: str, elapsed: float, stats: list[StageStats],
            has_text: bool, regimes: Regimes | None = None) -> GenerationResult:
    n = len(out.ids)
    extra = {} if regimes is None else {"regimes": regimes.summary()}
    return GenerationResult(
        token_ids=out.ids,
        text=out.detok.text if has_text else None,
        stats={
            "mode": mode,
            "new_tokens": n,
            "seconds": elapsed,
            "tokens_per_s": n / elapsed if elapsed > 0 else 0.0,
            "stages": [s.as_dict() for s in stats],
            **extra,
        },
        stage_stats=stats,
        finish_reason=out.reason,
    )
