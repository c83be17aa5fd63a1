"""FastPipeline: lossless greedy output for k = 1..4 in every mode, exact sampling
distributions (chi-square), argument errors, and failure behaviour."""

import threading
import time

import pytest
import torch
from scipy.stats import chisquare
from tiny import family, hf_state_of, write_tiny_checkpoint

from pipespec_fast import FastPipeline, HFStage, LlamaStage, StageError, config
from pipespec_fast.reference import probs_from_logits

PROMPT = [1, 5, 7, 9, 3, 11]


def stages_for(k, noise=0.05, seed=0, device="cpu", **kw):
    return [LlamaStage(m.to(device), name=f"s{i}", max_len=256)
            for i, m in enumerate(family(k, noise=noise, seed=seed, **kw))]


def target_greedy(target_stage, prompt, n):
    return FastPipeline([target_stage]).generate(prompt, n, ignore_eos=True).token_ids


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_greedy_output_identical_to_target_alone(k, mode):
    stages = stages_for(k, seed=k)
    ref = target_greedy(stages[-1], PROMPT, 48)
    assert len(ref) == 48
    # fixed windows: the drafts are checked at every step (the adaptive window may switch
    # speculation off for tiny models; tests/test_window.py covers that mix)
    pipe = FastPipeline(stages, mode=mode, adaptive_windows=False)
    for prompt in (PROMPT, [2], list(range(3, 40))):
        want = ref if prompt is PROMPT else target_greedy(stages[-1], prompt, 48)
        res = pipe.generate(prompt, 48, ignore_eos=True)
        assert res.token_ids == want
    if k > 1:  # the drafts really were checked, and were neither all right nor all wrong
        tgt = res.stage_stats[-1]
        assert tgt.proposed > 0 and 0 < tgt.accepted < tgt.proposed


def test_pipespec_uses_every_stage_and_records_stats():
    stages = stages_for(3, seed=7)
    res = FastPipeline(stages, adaptive_windows=False).generate(PROMPT, 40, ignore_eos=True)
    s0, s1, s2 = res.stage_stats
    assert s0.drafted > 0 and s2.accepted > 0
    assert s1.forwards > 0 and s2.forwards > 0
    assert s2.drafted == 0  # the target only verifies
    for s in res.stage_stats:
        assert s.busy_s > 0 and s.timeline and all(b >= a for a, b, _ in s.timeline)
    d = res.stats["stages"][2]
    assert 0 < d["acceptance_rate"] < 1 and d["mean_accepted_length"] > 1
    for s in (s1, s2):  # per-depth acceptance adds up to the stage's own counts
        assert sum(s.depth_accepted) == s.accepted
        assert sum(s.depth_tried) == s.accepted + s.rejected
        assert all(t >= u for t, u in zip(s.depth_tried[:-1], s.depth_tried[1:], strict=True))
    assert res.stats["new_tokens"] == 40 and res.stats["tokens_per_s"] > 0


def test_windows_and_leads_are_configurable_and_stay_lossless():
    stages = stages_for(3, seed=3)
    ref = target_greedy(stages[-1], PROMPT, 40)
    for windows, leads in [([0, 1, 1], [1, 1, 0]), ([0, 12, 3], [16, 2, 0])]:
        pipe = FastPipeline(stages, windows=windows, max_leads=leads)
        assert pipe.generate(PROMPT, 40, ignore_eos=True).token_ids == ref
    for bad in ([0, 0, 1], [0, 1, 49], [0, 1]):  # windows are capped at api.MAX_WINDOW = 48
        with pytest.raises(ValueError, match=r"windows: expected 3 entries in \[1, 48\]"):
            FastPipeline(stages, windows=bad)


def test_hf_adapter_stage_in_a_pipeline_gives_identical_greedy_output():
    transformers = pytest.importorskip("transformers")
    draft, target = stages_for(2, seed=11, vocab=64)
    cfg = target.model.config
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        intermediate_size=cfg.intermediate_size, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta, max_position_embeddings=512)
    hm = transformers.LlamaForCausalLM(hc).eval()
    # a noisy copy of the target as an HF model: load our draft's weights into it
    m = draft.model
    hm.load_state_dict(hf_state_of(m), strict=False)
    hf_stage = HFStage(hm, name="hf-draft")
    ref = target_greedy(target, PROMPT, 40)
    for mode in ("pipespec", "sync"):
        res = FastPipeline([hf_stage, target], mode=mode, adaptive_windows=False).generate(
            PROMPT, 40, ignore_eos=True)
        assert res.token_ids == ref
        assert res.stage_stats[1].accepted > 0
    # the HF adapter as the target, too
    assert FastPipeline([hf_stage]).generate(PROMPT, 20, ignore_eos=True).token_ids == \
        target_greedy(LlamaStage(m, max_len=256), PROMPT, 20)


# ----------------------------------------------------------------------------- sampling


def exact_joint(target_stage, prompt, temperature, top_k, top_p):
    """The target's exact distribution over its first two sampled tokens."""
    model = target_stage.model
    V = model.config.vocab_size
    cache = model.new_cache(64)
    p1 = probs_from_logits(model(torch.tensor(prompt), cache, last_n=1)[0], temperature, top_k,
                           top_p)
    joint = torch.zeros(V, V, dtype=torch.float64)
    base = cache.length
    for a in range(V):
        if p1[a] == 0:
            continue
        cache.rollback(base)
        p2 = probs_from_logits(model(torch.tensor([a]), cache)[0], temperature, top_k, top_p)
        joint[a] = p1[a].double() * p2.double()
    return joint


@pytest.mark.parametrize("k,mode,temperature,top_k,top_p", [
    (2, "pipespec", 1.0, None, None),
    (3, "pipespec", 0.7, 5, None),
    (2, "sync", 1.3, None, 0.8),
    (3, "sync", 1.0, None, None),
])
def test_sampling_matches_target_distribution(k, mode, temperature, top_k, top_p):
    stages = stages_for(k, noise=0.6, seed=21 + k, vocab=6)
    prompt = [1, 5, 2, 3, 0, 4]
    joint = exact_joint(stages[-1], prompt, temperature, top_k, top_p)
    pipe = FastPipeline(stages, mode=mode)
    V = joint.shape[0]
    n = 2000
    counts = torch.zeros(V * V)
    accepted = 0
    for seed in range(n):
        res = pipe.generate(prompt, 2, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, ignore_eos=True)
        a, b = res.token_ids
        counts[a * V + b] += 1
        accepted += res.stage_stats[-1].accepted
    assert accepted > 0  # drafts were really accepted, not all resampled
    exp = joint.flatten() * n
    keep = exp > 0
    assert counts[~keep].sum() == 0  # nothing outside top-k / top-p support
    # pool rare cells so every expected count is >= 5
    order = torch.argsort(exp[keep])
    obs_k, exp_k = counts[keep][order].double(), exp[keep][order]
    rare = exp_k.cumsum(0) < 10
    obs = torch.cat([obs_k[~rare], obs_k[rare].sum().reshape(1)]) if rare.any() else obs_k
    ex = torch.cat([exp_k[~rare], exp_k[rare].sum().reshape(1)]) if rare.any() else exp_k
    p = chisquare(obs.numpy(), ex.numpy() * obs.sum().item() / ex.sum().item()).pvalue
    assert p > 1e-3, p


def test_seed_reproduces_synchronous_sampling():
    pipe = FastPipeline(stages_for(2, seed=5), mode="sync")
    a = pipe.generate(PROMPT, 20, temperature=1.0, seed=123, ignore_eos=True).token_ids
    b = pipe.generate(PROMPT, 20, temperature=1.0, seed=123, ignore_eos=True).token_ids
    c = pipe.generate(PROMPT, 20, temperature=1.0, seed=124, ignore_eos=True).token_ids
    assert a == b and a != c


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"max_new_tokens": -1}, "max_new_tokens"),
    ({"seed": -3}, "seed"),
    ({"max_new_tokens": 10_000}, "max_new_tokens"),
    ({"mode": "turbo"}, "mode"),
])
def test_invalid_arguments_raise_value_error_naming_them(kwargs, name):
    pipe = FastPipeline(stages_for(2))
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe.generate(PROMPT, **kwargs)


def test_prompt_errors():
    pipe = FastPipeline(stages_for(2))
    with pytest.raises(ValueError, match="prompt"):
        pipe.generate([], 4)
    with pytest.raises(ValueError, match="prompt"):
        pipe.generate(list(range(10)) * 30, 4)  # longer than the 256-token context
    with pytest.raises(ValueError, match="prompt"):
        pipe.generate([1, 2, 999], 4)  # outside the vocab
    with pytest.raises(ValueError, match="tokenizer"):
        pipe.generate("text needs a tokenizer", 4)


def test_vocab_mismatch_is_refused_naming_both_stages():
    a = stages_for(1, vocab=64)[0]
    b = stages_for(1, vocab=80)[0]
    a.name, b.name = "small", "big"
    with pytest.raises(ValueError, match=r"vocab.*'small'.*'big'"):
        FastPipeline([a, b])


class Exploding:
    """Wraps a stage and raises on its n-th forward."""

    def __init__(self, inner, after):
        self.inner, self.after, self.calls = inner, after, 0
        self.name, self.vocab_size, self.max_len = "boom", inner.vocab_size, inner.max_len

    cache_len = property(lambda self: self.inner.cache_len)
    device = property(lambda self: self.inner.device)
    capabilities = property(lambda self: self.inner.capabilities)

    def forward(self, tokens, parents=None, last_n=None):
        self.calls += 1
        if self.calls > self.after:
            raise RuntimeError("injected failure")
        return self.inner.forward(tokens, parents, last_n)

    def rollback(self, length):
        self.inner.rollback(length)

    def keep_path(self, *a, **kw):
        self.inner.keep_path(*a, **kw)


def _stage_threads():
    return [t for t in threading.enumerate() if t.name.startswith("pipespec-stage")]


@pytest.mark.parametrize("where", [0, 1, 2])
def test_stage_failure_reaches_caller_fast_and_pipeline_recovers(where):
    stages = stages_for(3, seed=2)
    boom = Exploding(stages[where], after=5)
    stages[where] = boom
    # fixed windows: every stage keeps working (an adaptive target may pause the drafter on a
    # loaded machine, and a paused stage never reaches its failing forward)
    pipe = FastPipeline(stages, adaptive_windows=False)
    t = time.perf_counter()
    with pytest.raises(StageError, match=rf"stage {where} \(boom\).*injected failure") as ei:
        pipe.generate(PROMPT, 200, ignore_eos=True)
    assert time.perf_counter() - t < 2.0
    assert isinstance(ei.value.__cause__, RuntimeError)
    assert not _stage_threads()
    boom.after = 10**9  # healed: the same pipeline generates again, still lossless
    ref = target_greedy(stages[-1] if where != 2 else boom.inner, PROMPT, 30)
    assert pipe.generate(PROMPT, 30, ignore_eos=True).token_ids == ref
    pipe.close()
    pipe.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pipe.generate(PROMPT, 4)


def test_early_stop_of_a_stream_frees_the_workers():
    stages = stages_for(3, seed=4)
    pipe = FastPipeline(stages)
    gen = pipe._run(PROMPT, 100, ignore_eos=True)  # one step per verified chunk
    next(gen)
    assert _stage_threads()  # mid-generation: the workers are running
    gen.close()
    assert not _stage_threads()
    assert pipe.last_result is None  # abandoned: no result was recorded
    with FastPipeline(stages) as p2:
        assert len(p2.generate(PROMPT, 10, ignore_eos=True).token_ids) == 10
    assert not _stage_threads()


def test_eos_proposed_by_a_draft_but_not_the_target_does_not_end_output():
    stages = stages_for(2, seed=9)
    ref = target_greedy(stages[-1], PROMPT, 30)
    draft_only = [t for t in range(64) if t not in ref]
    eos = draft_only[0]
    # make the draft love the eos token: it proposes it constantly
    with torch.no_grad():
        stages[0].model.output.weight[eos] *= 0
        stages[0].model.output.weight[eos] += 50 * stages[0].model.norm.weight.sign()
    pipe = FastPipeline(stages, eos_token_ids=[eos])
    res = pipe.generate(PROMPT, 30)
    assert res.token_ids == ref and res.finish_reason == "length"
    assert res.stage_stats[0].drafted > 0


def test_eos_from_the_target_ends_output():
    stages = stages_for(2, seed=9)
    ref = target_greedy(stages[-1], PROMPT, 30)
    eos = ref[12]
    res = FastPipeline(stages, eos_token_ids=[eos]).generate(PROMPT, 30)
    assert res.token_ids == ref[: ref.index(eos) + 1] and res.finish_reason == "eos"


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_triton_backend_gives_the_same_greedy_tokens(mode, configure):
    """Every op of the engine through the Triton kernels (compiled on CUDA where CUDA exists,
    Triton's interpreter on CPU tensors elsewhere: ``kernel_device``): the same greedy tokens
    as the reference backend, and as the target alone."""
    pytest.importorskip("triton")
    from kernel_device import CHOICE

    configure(triton_interpret=CHOICE.interpret)  # what conftest set before Triton loaded
    stages = stages_for(3, seed=13, n_layers=1, device=CHOICE.device)
    configure(backend="reference")
    ref = target_greedy(stages[-1], PROMPT, 12)
    configure(backend="triton")
    from pipespec_fast import ops

    assert ops.backend_for(torch.zeros(1, device=CHOICE.device)) == "triton"
    # fixed windows: every step verifies, so the acceptance kernels run too
    res = FastPipeline(stages, mode=mode, adaptive_windows=False).generate(PROMPT, 12,
                                                                          ignore_eos=True)
    assert res.token_ids == ref
    assert res.stage_stats[-1].accepted > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: one stream per stage, "
                    "pinned host buffers and events are exercised only on a GPU")
@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_cuda_streams_pipeline_greedy_and_sampling(mode):
    stages = [LlamaStage(m.to("cuda"), name=f"s{i}", max_len=256)
              for i, m in enumerate(family(3, noise=0.05, seed=17))]
    ref = target_greedy(stages[-1], PROMPT, 40)
    pipe = FastPipeline(stages, mode=mode)
    assert pipe.generate(PROMPT, 40, ignore_eos=True).token_ids == ref
    res = pipe.generate(PROMPT, 40, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)
    assert len(res.token_ids) == 40 and res.stage_stats[-1].proposed > 0


def test_failure_in_an_inline_ngram_drafter_names_it():
    from pipespec_fast.stages.ngram import NGramStage

    target = stages_for(1, seed=2)[0]
    ng = NGramStage(target.vocab_size, max_len=256)
    ng.name = "ngram-boom"

    def boom(*a, **kw):
        raise RuntimeError("injected failure")

    ng.forward = boom
    with pytest.raises(StageError, match=r"stage 0 \(ngram-boom\).*injected failure"):
        FastPipeline([ng, target]).generate(PROMPT, 20, ignore_eos=True)
    assert not _stage_threads()


def test_from_pretrained_text_pipeline_and_tokenizer_mismatch(tmp_path):
    draft, target = family(2, noise=0.05, seed=31)
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    write_tiny_checkpoint(tmp_path / "draft", draft, words)
    write_tiny_checkpoint(tmp_path / "target", target, words)
    pipe = FastPipeline.from_pretrained([tmp_path / "draft", tmp_path / "target"], max_len=256)
    res = pipe.generate("w1 w5 w7 w9", 12, ignore_eos=True)
    ids = pipe.tokenizer.encode("w1 w5 w7 w9", add_special_tokens=False)
    assert res.token_ids == target_greedy(LlamaStage(target, max_len=256), ids, 12)
    assert res.text == pipe.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    assert res.text.split() == [words[t] for t in res.token_ids if t != 0]
    other = ["<unk>"] + [f"v{i}" for i in range(63)]  # same size, different vocabulary
    write_tiny_checkpoint(tmp_path / "other", draft, other)
    with pytest.raises(ValueError, match=r"vocab.*'other'.*'target'"):
        FastPipeline.from_pretrained([tmp_path / "other", tmp_path / "target"])


def test_one_generation_at_a_time_per_pipeline():
    pipe = FastPipeline(stages_for(2, seed=6))
    gen = pipe._run(PROMPT, 40, ignore_eos=True)
    next(gen)  # mid-stream (no tokenizer: yields empty pieces per verified chunk)
    with pytest.raises(RuntimeError, match="already generating"):
        pipe.generate(PROMPT, 4)
    gen.close()
    assert len(pipe.generate(PROMPT, 4, ignore_eos=True).token_ids) == 4


def test_cli_runs_a_three_stage_pipeline(tmp_path, capsys):
    from pipespec_fast.cli import main

    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    dirs = []
    for name, model in zip(("small", "mid", "big"), family(3, noise=0.05, seed=41), strict=True):
        write_tiny_checkpoint(tmp_path / name, model, words)
        dirs.append(str(tmp_path / name))
    assert main(["generate", "--models", *dirs, "--prompt", "w1 w5 w7", "--max-new-tokens", "10",
                 "--ignore-eos", "--max-len", "128"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "[pipespec: small -> mid -> big] 10 tokens" in last and "tokens/s" in last
    assert main(["generate", "--models", dirs[0], "--prompt", "w1", "--top-p", "3"]) == 2
    assert "--top-p" in capsys.readouterr().err


# ------------------------------------------------------------------ vocabulary-subset drafts


@pytest.mark.parametrize("mode", ["pipespec", "sync"])
def test_vocab_subset_draft_stays_lossless_under_greedy(mode):
    """A draft that cannot propose most tokens still yields exactly the target's output."""
    from tiny import subset_draft

    models = family(3, noise=0.05, seed=11)
    t_stage = LlamaStage(models[2], name="t", max_len=256)
    ref = target_greedy(t_stage, PROMPT, 48)
    missing = sorted(set(ref))[::3]  # tokens the target emits but the draft cannot
    ids = [t for t in range(64) if t not in missing]
    stages = [LlamaStage(subset_draft(models[0], ids), name="sub0", max_len=256),
              LlamaStage(models[1], name="s1", max_len=256), t_stage]
    res = FastPipeline(stages, mode=mode, adaptive_windows=False).generate(PROMPT, 48,
                                                                          ignore_eos=True)
    assert res.token_ids == ref
    assert res.stage_stats[0].drafted > 0
    if mode == "sync":  # (in PipeSpec, thread timing decides how many get checked)
        s1 = res.stage_stats[1]
        assert 0 < s1.accepted < s1.proposed  # the subset draft's tokens were checked


@pytest.mark.parametrize("mode,top_k,ngram", [
    ("pipespec", None, False), ("sync", None, False),
    ("pipespec", 5, False),  # top-k wider than the draft's support: -inf rows stay -inf
    ("pipespec", None, True),  # the default shape: n-gram -> subset draft -> target
])
def test_vocab_subset_draft_keeps_the_sampling_distribution(mode, top_k, ngram):
    """Tokens outside the draft's subset come only from the residual: still exact."""
    from tiny import subset_draft

    from pipespec_fast.stages.ngram import NGramStage

    models = family(2, noise=0.6, seed=31, vocab=6)
    target = LlamaStage(models[1], name="t", max_len=64)
    prompt = [1, 5, 2, 3, 0, 4, 1, 5, 2]
    joint = exact_joint(target, prompt, 1.0, top_k, None)
    first = joint.view(6, 6).sum(1)
    missing = first.argsort(descending=True)[[0, 3]].tolist()  # the favourite and one more
    assert first[missing].sum() > 0.2  # the target often picks tokens the draft lacks
    ids = [t for t in range(6) if t not in missing]
    stages = [LlamaStage(subset_draft(models[0], ids), name="sub", max_len=64), target]
    if ngram:
        stages.insert(0, NGramStage(6, max_len=64, min_confident_match=1))
    pipe = FastPipeline(stages, mode=mode)
    n, V = 2000, 6
    counts = torch.zeros(V * V)
    accepted = 0
    for seed in range(n):
        res = pipe.generate(prompt, 2, temperature=1.0, top_k=top_k, seed=seed,
                            ignore_eos=True)
        a, b = res.token_ids
        counts[a * V + b] += 1
        accepted += res.stage_stats[-1].accepted
    assert accepted > 0
    exp = joint.flatten().double() * n
    assert counts[exp == 0].sum() == 0
    keep = exp >= 5
    obs = torch.cat([counts[keep].double(), counts[~keep].sum().reshape(1)])
    ex = torch.cat([exp[keep], exp[~keep].sum().reshape(1)])
    p = chisquare(obs.numpy(), ex.numpy() * obs.sum().item() / ex.sum().item()).pvalue
    assert p > 1e-3, p


def test_stage_threads_setting_is_validated_and_only_used_by_pipespec():
    stages = stages_for(3, seed=5)
    ref = target_greedy(stages[-1], PROMPT, 24)
    pipe = FastPipeline(stages, config=config.current().replace(stage_threads=(1, 1, 2)))
    assert pipe.generate(PROMPT, 24, ignore_eos=True).token_ids == ref
    for mode in ("ar", "sync"):  # not concurrent: the setting does not apply
        assert pipe.generate(PROMPT, 24, ignore_eos=True, mode=mode).token_ids == ref
    for bad in ("1,x,2", "1,0,1"):
        with pytest.raises(ValueError, match="PIPESPEC_STAGE_THREADS"):
            config.from_env({"PIPESPEC_STAGE_THREADS": bad})
    with pytest.raises(ValueError, match="PIPESPEC_STAGE_THREADS"):
        config.RuntimeConfig(stage_threads=(1, 0, 1))
    wrong = FastPipeline(stages, config=config.current().replace(stage_threads=(1, 2)))
    with pytest.raises(ValueError, match="PIPESPEC_STAGE_THREADS"):
        wrong.generate(PROMPT, 4)
    with pytest.raises(ValueError, match="config"):
        FastPipeline(stages, config={"stage_threads": (1, 1, 2)})
    assert FastPipeline(stages).generate(PROMPT, 24, ignore_eos=True).token_ids == ref


@pytest.mark.parametrize("mode", ["sync", "pipespec"])
@pytest.mark.parametrize("tree_budget", [0, 6])
@pytest.mark.parametrize("max_new", [1, 2, 3, 7])
def test_the_target_never_commits_past_the_limit(mode, tree_budget, max_new):
    """Drafts the target always accepts (an n-gram drafter on a periodic prompt under a draft
    that is the target's exact copy): its steps commit exactly ``max_new`` tokens (accepted
    drafts plus one of its own per step), none past the limit, and the output is AR's."""
    from pipespec_fast import NGramStage

    draft_m, target_m = family(2, noise=0.0, seed=12)  # noise 0: the same weights
    stages = [LlamaStage(draft_m, name="copy", max_len=128),
              LlamaStage(target_m, name="target", max_len=128)]
    prompt = [4, 9, 2, 4, 9, 2, 4, 9, 2, 4, 9]
    ref = FastPipeline(stages[-1:]).generate(prompt, max_new, ignore_eos=True).token_ids
    pipe = FastPipeline([NGramStage(stages[-1].vocab_size, max_len=128)] + stages, mode=mode,
                        tree_budget=tree_budget, regimes=False)
    for _ in range(3):  # the windows grow with the acceptance measured
        res = pipe.generate(prompt, max_new, ignore_eos=True)
        assert res.token_ids == ref
        st = res.stage_stats[-1]
        assert st.accepted + st.verify_steps == max_new, st
