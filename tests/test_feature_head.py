"""The feature head (``models/feature_head.py``, ``stages/feature_head.py``): a one-layer draft
reading the target's features. Its rows drafted from its own estimates are computed again from
the target's features once committed, leaving its cache as a fresh run's; every pipeline with
it gives the target's own greedy output, and seeded sampling follows the target's
distribution."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny import build, random_hf_state, tiny_config, write_tiny_checkpoint

from pipespec_fast import FastPipeline, LlamaStage
from pipespec_fast.models.feature_head import FeatureHead
from pipespec_fast.stages.feature_head import FeatureHeadStage
from pipespec_fast.stages.ngram import NGramStage

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6]


def _target(vocab: int = 24, seed: int = 5):
    cfg = tiny_config(vocab=vocab, n_layers=2)
    return build(cfg, random_hf_state(cfg, seed))


def _head(target, seed: int = 7, mix: float = 0.5) -> FeatureHead:
    """A head whose layer is the target's last one, fed a mix of the token's embedding and
    the previous feature: a weak but far-from-random draft of the target."""
    cfg = replace(target.config, n_layers=1)
    sd = random_hf_state(cfg, seed)
    body = build(cfg, sd)
    with torch.no_grad():
        body.layers[0].load_state_dict(target.layers[-1].state_dict())
        body.norm.weight.copy_(target.norm.weight)
        body.output.weight.copy_(target.output.weight)
    d = cfg.dim
    fc_w = torch.cat([torch.eye(d), mix * torch.eye(d)], 1)
    return FeatureHead(body, fc_w, torch.zeros(d), target.tok_embeddings)


def _stages(ngram: bool = False, vocab: int = 24):
    target = LlamaStage(_target(vocab), name="target", max_len=256)
    head = FeatureHeadStage(_head(target.model), target, name="head")
    return ([NGramStage(target.vocab_size)] if ngram else []) + [head, target]


def test_recomputed_rows_leave_the_cache_of_a_fresh_run():
    """Rows the head drafted from its own estimates are computed again from the target's
    features once it committed them: the head's K/V then equal a fresh head's fed the same
    tokens after the target's features, and so do its logits."""
    head, target = _stages()
    seq = torch.tensor(PROMPT)
    target.forward(seq[:12])  # the target commits 12 rows
    target.rollback(12)
    head.forward(seq[:16], last_n=1)  # rows 13..15 run on the head's own estimates
    assert head._real == 13
    target.forward(seq[12:18])
    target.rollback(18)  # now committed up to 18: the head redoes rows 13..15 first
    got = head.forward(seq[16:19], last_n=3)
    assert head._real == 19 and head.cache_len == 19
    fresh = FeatureHeadStage(head.head, target, name="fresh")
    want = fresh.forward(seq[:19], last_n=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.cache.k[:, :, :19], fresh.cache.k[:, :, :19])
    torch.testing.assert_close(head.cache.v[:, :, :19], fresh.cache.v[:, :, :19])


def _reference_logits(head: FeatureHead, target, seq: torch.Tensor) -> torch.Tensor:
    """The head over ``seq`` straight from the model: the target's features of every row
    (a fresh forward), row ``q`` fed the one of row ``q - 1``."""
    feats = torch.zeros(len(seq) + 1, target.config.dim)
    target(seq, target.new_cache(len(seq) + 1), features=feats)
    prev = torch.cat([torch.zeros(1, target.config.dim), feats[: len(seq) - 1]])
    return head.forward(seq, prev, head.new_cache(len(seq) + 1), last_n=len(seq))[0]


@pytest.mark.parametrize("committed", [13, 16, 18])
def test_a_recompute_gives_the_logits_of_the_model_on_the_targets_features(committed):
    """Drafted rows, then the target commits some: the head recomputes what the target's
    features reach, and of the two new rows, those they reach (none, one, both) have the
    logits of the model over the target's features (not the stage against itself); the
    others run on the head's own estimates."""
    head, target = _stages()
    seq = torch.tensor(PROMPT)
    target.forward(seq[:10])
    target.rollback(10)
    head.forward(seq[:16], last_n=1)  # rows 11..15 on the head's own estimates
    target.forward(seq[10:committed])
    target.rollback(committed)
    got = head.forward(seq[16:18], last_n=2)
    assert head._real == min(committed + 1, 18)
    want = _reference_logits(head.head, target.model, seq[:18])
    reach = min(2, committed + 1 - 16)  # of the two new rows, those the target's features reach
    if reach > 0:
        torch.testing.assert_close(got[:reach], want[16:16 + reach], rtol=1e-5, atol=1e-5)
    if reach < 2:
        assert not torch.allclose(got[-1], want[17], atol=1e-3)  # own estimates differ


def test_tree_verification_keeps_the_accepted_paths_features():
    """``keep_path`` moves the accepted nodes' features with their K/V: the rows equal a chain
    forward of the accepted tokens."""
    _head_stage, target = _stages()
    seq = torch.tensor(PROMPT[:8])
    target.forward(seq)
    target.rollback(8)
    tree = torch.tensor([4, 9, 7, 2, 11])
    parents = torch.tensor([-1, 0, 0, 2, 3])  # accepted path: nodes 0, 2, 3
    target.forward(tree, parents=parents)
    target.keep_path(8, torch.tensor([0, 2, 3]), 3)
    assert target.features_valid == 11
    chain = LlamaStage(target.model, name="chain", max_len=256)
    chain.keep_features()
    chain.forward(torch.cat([seq, torch.tensor([4, 7, 2])]))
    torch.testing.assert_close(target.features[:11], chain.features[:11], rtol=1e-5, atol=1e-5)


def test_rows_past_the_targets_run_one_by_one_on_own_estimates():
    """Past what the target committed, row q reads the head's own ĝ of row q - 1: the same
    logits as feeding the rows one at a time."""
    head, target = _stages()
    seq = torch.tensor(PROMPT)
    target.forward(seq[:8])
    target.rollback(8)
    block = head.forward(seq[:14], last_n=6)
    other = FeatureHeadStage(head.head, target, name="other")
    other.forward(seq[:9], last_n=1)
    rows = [other.forward(seq[i:i + 1], last_n=1) for i in range(9, 14)]
    torch.testing.assert_close(block[1:], torch.cat(rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,ngram", [("sync", False), ("sync", True), ("pipespec", False),
                                        ("pipespec", True)])
def test_greedy_output_is_the_targets(mode, ngram):
    """Fixed windows (the tiny head costs what the tiny target does: adaptive ones would
    find that its drafts do not pay)."""
    stages = _stages(ngram=ngram)
    pipe = FastPipeline(stages, mode=mode, adaptive_windows=False, regimes=False)
    ref = FastPipeline(stages[-1:])
    accepted = 0
    for prompt in (PROMPT, [2, 7, 2, 7, 2, 7, 2], [1, 2]):
        res = pipe.generate(prompt, 48, ignore_eos=True)
        assert res.token_ids == ref.generate(prompt, 48, ignore_eos=True).token_ids
        accepted += res.stage_stats[-1].accepted
    assert accepted > 0  # the head's drafts were verified, and some accepted
    pipe.close()


def test_seeded_sampling_repeats_and_follows_the_targets_distribution():
    """Seeded sync over [feature head -> target] with fixed windows: the same seed gives the
    same tokens, and the first two tokens (a verification of the head's drafts) follow the
    target's joint distribution (chi-square over 1500 seeds)."""
    from test_ngram import chi_square_p
    from test_tree_decoding import exact_joint

    from pipespec_fast.decoding.sampling import SamplingParams

    V, n = 6, 1500
    stages = _stages(vocab=V)
    prompt = [1, 5, 2, 3, 1, 5, 2]
    joint = exact_joint(stages[-1], prompt, SamplingParams(0.9))
    pipe = FastPipeline(stages, mode="sync", adaptive_windows=False, regimes=False)
    first = pipe.generate(prompt, 30, temperature=0.9, seed=5, ignore_eos=True).token_ids
    assert pipe.generate(prompt, 30, temperature=0.9, seed=5, ignore_eos=True).token_ids == first
    counts = torch.zeros(V * V, dtype=torch.float64)
    accepted = 0
    for seed in range(n):
        res = pipe.generate(prompt, 2, temperature=0.9, seed=seed, ignore_eos=True)
        a, b = res.token_ids
        counts[a * V + b] += 1
        accepted += res.stage_stats[-1].accepted
    assert accepted > n // 10  # the head's drafts decided many of the pairs
    assert chi_square_p(counts, joint.flatten() * n) > 1e-3


def test_trees_are_refused_by_name():
    head, _target_stage = _stages()
    with pytest.raises(NotImplementedError, match="head: a feature head runs chains"):
        head.forward(torch.tensor([1, 2]), parents=torch.tensor([-1, 0]))
    with pytest.raises(NotImplementedError, match="head: a feature head keeps chains"):
        head.keep_path(0, torch.tensor([0]), 1)


def test_an_exported_head_loads_below_its_target_and_nowhere_else(tmp_path):
    """``tools/train_feature_head.export`` writes a folder ``from_pretrained`` puts below the
    target (the target's tokenizer, a vocabulary subset, fc beside the checkpoint); greedy
    output is the target's. Anywhere else in the list it is refused by name."""
    from tools.train_feature_head import TrainHead, export

    target = _target(vocab=64)
    words = ["<unk>"] + [f"w{i}" for i in range(63)]
    write_tiny_checkpoint(tmp_path / "target", target, words)
    torch.manual_seed(0)
    ids = torch.arange(0, 64, 2)
    export(TrainHead(target.config), tmp_path / "target", target, ids, tmp_path / "head", {})
    pipe = FastPipeline.from_pretrained([tmp_path / "head", tmp_path / "target"], max_len=256,
                                        mode="sync", adaptive_windows=False, regimes=False)
    assert [type(s).__name__ for s in pipe.stages] == ["FeatureHeadStage", "LlamaStage"]
    ref = FastPipeline([LlamaStage(target, max_len=256)])
    res = pipe.generate("w1 w5 w7 w9", 24, ignore_eos=True)
    ids_in = pipe.tokenizer.encode("w1 w5 w7 w9", add_special_tokens=False)
    assert res.token_ids == ref.generate(ids_in, 24, ignore_eos=True).token_ids
    assert res.stage_stats[-1].proposed > 0
    with pytest.raises(ValueError, match=r"paths: .*head is a feature head: it goes right below"):
        FastPipeline.from_pretrained([tmp_path / "head", tmp_path / "target", tmp_path / "target"])
    with pytest.raises(ValueError, match=r"devices: the feature head .*head and its target run"):
        FastPipeline.from_pretrained([tmp_path / "head", tmp_path / "target"],
                                     devices=["cpu", "cuda"])


def test_the_trained_layer_is_the_exported_heads_forward(tmp_path):
    """``TrainHead`` (training, plain torch) and the exported folder loaded as a
    ``FeatureHead`` (our model) compute the same estimates and logits."""
    from tools.train_feature_head import TrainHead, export

    target = _target(vocab=64)
    write_tiny_checkpoint(tmp_path / "target", target, ["<unk>"] + [f"w{i}" for i in range(63)])
    torch.manual_seed(3)
    train = TrainHead(target.config)
    with torch.no_grad():
        for p in train.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.arange(0, 64, 2)
    export(train, tmp_path / "target", target, ids, tmp_path / "head", {})
    head = FeatureHead.from_pretrained(tmp_path / "head", target)
    seq = torch.tensor(PROMPT)
    g = torch.Generator().manual_seed(1)
    feats = target.norm(torch.randn(len(seq), target.config.dim, generator=g))
    logits, est = head.forward(seq, feats, head.new_cache(64), last_n=len(seq))
    n = len(seq)
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    want = train(target.tok_embeddings(seq)[None], feats[None], torch.arange(n)[None], mask,
                 target.norm.weight)[0]
    torch.testing.assert_close(est, want, rtol=2e-2, atol=2e-2)  # fp16 weights on disk
    sub = target.tok_embeddings.weight[ids]
    assert (logits[:, ids].argmax(-1) == (want @ sub.T).argmax(-1)).float().mean() > 0.9


def test_training_batches_losses_and_a_continued_heads_weights(tmp_path):
    """The training tool's batches pair (token p, feature p - 1) with targets at p inside an
    answer only; both losses (and the unrolled pass) are finite and reach every weight; an
    exported head loads back into training unchanged."""
    from tools.train_feature_head import Batches, TrainHead, export, load_head, losses

    target = _target(vocab=64)
    write_tiny_checkpoint(tmp_path / "target", target, ["<unk>"] + [f"w{i}" for i in range(63)])
    g = torch.Generator().manual_seed(0)
    lens = [7, 12, 5]
    data = {"x": torch.randn(sum(lens), 32, generator=g).half(),
            "tok": torch.randint(0, 64, (sum(lens),), generator=g),
            "off": torch.tensor([0, 7, 19, 24])}
    emb = target.tok_embeddings.weight.detach()
    norm_w = target.norm.weight.detach()
    b = Batches(data, emb, norm_w, 1e-5, length=16).make([0, 1, 2])
    e, g_in, pos, mask, g_out, valid = b
    assert int(valid.sum()) == sum(n - 1 for n in lens)
    first = valid.float().argmax(1)  # each row's first answer starts at its position 1
    assert int(pos[0, first[0]]) == 1
    spans = ((0, 7), (7, 19), (19, 24))
    before = torch.cat([torch.arange(a, b - 1) for a, b in spans])  # feature p - 1
    at = torch.cat([torch.arange(a + 1, b) for a, b in spans])  # token and targets at p
    torch.testing.assert_close(g_in[valid], data["x"][before].float())
    torch.testing.assert_close(g_out[valid], data["x"][at].float())
    torch.testing.assert_close(e[valid], emb[data["tok"][at]])
    head = TrainHead(target.config)
    sub = emb[torch.arange(0, 64, 2)]
    ce, reg = losses(head, b, norm_w, sub, 0.2, unroll=True)
    (ce + reg).backward()
    assert torch.isfinite(ce) and torch.isfinite(reg)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    export(head, tmp_path / "target", target, torch.arange(0, 64, 2), tmp_path / "head", {})
    again = TrainHead(target.config)
    load_head(again, tmp_path / "head")
    for (name, p), q in zip(head.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p.half().float(), msg=name)
