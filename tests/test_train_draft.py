"""The draft distillation recipe on a tiny target: data format, training, export.

The exported checkpoint must load in our ``Transformer`` (and as a transformers model) with the
logits of the trained module, and training must move the draft towards the target."""

import json
from pathlib import Path

import pytest
import torch
from tiny import build, random_hf_state, tiny_config

from pipespec_fast.models.checkpoint import load_checkpoint, save_state_dict
from pipespec_fast.models.llama import Transformer
from tools.draft_prompts import CODE_PREFIX, chat_prompts, code_prompts
from tools.train_draft import TrainDraft, choose_subset, main


def target_rows(model: Transformer, n: int, gen: int, k: int, seed: int) -> list[dict]:
    """What ``tools.draft_data`` stores: the target's greedy answers and top-k log-probs."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(0, model.config.vocab_size, (int(torch.randint(3, 9, (1,),
                               generator=g)),), generator=g).tolist()
        cache = model.new_cache(64)
        logits = model(torch.tensor(prompt), cache, last_n=1)
        toks, lps = [], []
        for _ in range(gen):
            lp = torch.log_softmax(logits[-1], -1)
            toks.append(int(lp.argmax()))
            lps.append(lp)
            logits = model(torch.tensor(toks[-1:]), cache)
        top_lp, top_ids = torch.stack(lps).topk(k, -1)
        rows.append(dict(kind="code" if i % 2 else "chat", sampled=False, prompt=prompt,
                         tokens=toks, top_ids=top_ids.to(torch.int32),
                         top_logp=top_lp.to(torch.float16)))
    return rows


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distil")
    cfg = tiny_config(vocab=48, dim=32, n_layers=2, tie=True)
    cfg.eos_token_ids = [2]
    sd = random_hf_state(cfg, seed=3, std=0.5)
    for name in sd:  # a second layer that changes little: one layer can learn the target
        if name.startswith("model.layers.1.") and "norm" not in name:
            sd[name] = sd[name] * 0.1
    save_state_dict(root / "target", sd, cfg)
    target = build(cfg, sd)
    (root / "data").mkdir()
    torch.save({"rows": target_rows(target, 240, 12, 8, seed=0)}, root / "data" / "shard-0000.pt")
    main(["--data", str(root / "data"), "--out", str(root / "draft"), "--target",
          str(root / "target"), "--layers", "1", "--init-layers", "1", "--subset", "32",
          "--epochs", "12", "--eval-every", "50", "--lr", "3e-3", "--held-out", "24",
          "--batch-tokens", "400", "--threads", "1"])
    return root, target


def test_exported_draft_loads_with_the_trained_logits(tiny_setup):
    root, _ = tiny_setup
    cfg, sd = load_checkpoint(root / "draft")
    assert cfg.n_layers == 1 and cfg.vocab_subset == 32 and cfg.tie_word_embeddings
    assert cfg.vocab_size == 48 and 2 in sd["model.vocab_subset_ids"].tolist()  # EOS kept
    ours = Transformer.from_pretrained(root / "draft")
    trained = TrainDraft.from_hf_state(cfg, sd)
    ids = sd["model.vocab_subset_ids"]
    rows = ours.vocab.rows
    toks = torch.randint(0, 48, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained.logits(trained.hidden(rows[toks][None]))[0]
    got = ours(toks, ours.new_cache(32))
    torch.testing.assert_close(got[:, ids], want, rtol=1e-4, atol=1e-4)
    assert torch.isneginf(got[:, rows == 32]).all()

    from tools.hf_subset import load_hf_model

    hf = load_hf_model(root / "draft")
    with torch.no_grad():
        hf_logits = hf(toks[None]).logits[0]
    torch.testing.assert_close(hf_logits[:, ids], got[:, ids], rtol=1e-4, atol=1e-4)
    assert torch.isneginf(hf_logits[:, rows == 32]).all()


def test_training_fits_the_targets_distributions(tiny_setup):
    """(A random tiny target does not generalise; the real one's held-out agreement is in
    models/drafts/*/training.json.)"""
    root, _ = tiny_setup
    meta = json.loads((root / "draft" / "training.json").read_text())
    first, last = meta["train_loss_first_steps"], meta["train_loss_last_steps"]
    assert last < 0.8 * first, (first, last)
    assert set(meta["held_out_greedy_agreement"]) == {"chat", "code"}
    assert meta["steps"] > 0 and meta["generated_tokens"] == 216 * 12


def test_subset_takes_the_most_generated_tokens_and_required_ones():
    rows = [dict(tokens=[5, 5, 5, 7, 7, 9], top_ids=torch.tensor([[5, 1, 1, 1]] * 6))]
    assert choose_subset(rows, 3, always=[0]).tolist() == [0, 1, 5]
    assert choose_subset(rows, 2, always=[]).tolist() == [1, 5]


def test_prompts_are_deterministic_and_shaped_like_the_benchmarks():
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"]) / "json"
    code = code_prompts(5, seed=1, root=root)
    assert code == code_prompts(5, seed=1, root=root) and len(set(code)) == 5
    quotes = ('"' * 3, "'" * 3)
    assert all(p.startswith(CODE_PREFIX + "def ") and any(q in p for q in quotes) for p in code)
    chat = chat_prompts(200, seed=1)
    assert chat == chat_prompts(200, seed=1) and len(set(chat)) == 200
    assert chat != chat_prompts(200, seed=2)


def test_missing_default_draft_names_the_recipe(tmp_path, monkeypatch):
    from pipespec_fast.models import defaults

    monkeypatch.setattr(defaults, "DRAFT_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tools.train_draft"):
        defaults.default_model_dirs()


def test_shipped_default_draft_is_a_small_subset_model():
    """The committed draft: within the 40 MB budget, loads, and says how it was trained."""
    from pipespec_fast.models import defaults

    d = defaults.default_draft_dir()
    size = sum(p.stat().st_size for p in d.glob("*.safetensors"))
    assert size <= 40 * 10**6, size
    cfg, sd = load_checkpoint(d)
    assert cfg.vocab_subset and cfg.n_layers <= 4 and cfg.vocab_size == 49152
    meta = json.loads((d / "training.json").read_text())
    assert set(meta["held_out_greedy_agreement"]) == {"chat", "code"}


def test_training_continues_from_a_draft_on_several_data_sets(tiny_setup):
    root, target = tiny_setup
    (root / "data2").mkdir(exist_ok=True)
    torch.save({"rows": target_rows(target, 40, 12, 8, seed=1)}, root / "data2" / "shard-0000.pt")
    main(["--data", str(root / "data"), str(root / "data2"), "--out", str(root / "draft2"),
          "--target", str(root / "target"), "--init-from", str(root / "draft"), "--epochs", "1",
          "--held-out", "8", "--batch-tokens", "400", "--threads", "1"])
    first, _ = load_checkpoint(root / "draft")
    cfg, sd = load_checkpoint(root / "draft2")
    assert cfg == first  # shape and subset come from the draft continued
    assert sd["model.vocab_subset_ids"].tolist() == \
        load_checkpoint(root / "draft")[1]["model.vocab_subset_ids"].tolist()
    meta = json.loads((root / "draft2" / "training.json").read_text())
    assert meta["init_from"] == str(root / "draft") and meta["answers"] == 240 + 32


def test_reading_tasks_constrained_chat_and_typed_code_prompts(tmp_path):
    """The third kind of prompt (reading tasks over docstrings), the constrained chat prompts
    and typed code prompts cut from another folder: deterministic, distinct, of their form,
    no reading task resembling a benchmark question; the unconstrained chat prompts stay as
    they were (earlier data sets are rebuilt from them by ``--exclude-previous``)."""
    import sysconfig

    from tools.draft_prompts import CONSTRAINTS, DOC_TASKS, doc_prompts, resembles_benchmark

    root = Path(sysconfig.get_paths()["stdlib"]) / "json"
    docs = doc_prompts(6, seed=2, root=root)
    assert docs == doc_prompts(6, seed=2, root=root) and len(set(docs)) == 6
    heads = {t.split("{x}")[0] for t in DOC_TASKS}
    assert all(any(d.startswith(h) for h in heads) for d in docs)
    with pytest.raises(ValueError, match="doc_prompts: only"):
        doc_prompts(10_000, root=root)
    plain = chat_prompts(300, seed=1)
    constrained = chat_prompts(300, seed=1, constrained=True)
    assert plain == chat_prompts(300, seed=1)
    with_part = [p for p in constrained if any(p.endswith(c) for c in CONSTRAINTS)]
    assert 0.25 * 300 < len(with_part) < 0.55 * 300
    assert not any(resembles_benchmark(p) for p in docs)  # (chat ones: dropped by draft_data)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(
        'def typed(xs: list[int], k: int) -> int:\n    """Return the k-th largest of xs, '
        'counting from one, after sorting a copy."""\n    return sorted(xs)[-k]\n\n\n'
        'def untyped(xs):\n    """Return the values of xs in reverse order, as a new list '
        'and without changing xs."""\n    return xs[::-1]\n\n\nclass C:\n'
        '    def method(self, x: int) -> int:\n        """Return x plus one, the way a method '
        'of this class always does it."""\n        return x + 1\n')
    typed = code_prompts(5, root=tmp_path, typed=True)
    assert typed == [CODE_PREFIX + 'def typed(xs: list[int], k: int) -> int:\n    """Return '
                     'the k-th largest of xs, counting from one, after sorting a copy."""\n']
    assert len(code_prompts(5, root=tmp_path)) == 3  # untyped: functions and methods too


def test_the_store_tools_read_the_rows_training_keeps(tmp_path):
    """``tools/ngram_store.py`` and ``tools/target_answers.py`` read the data through
    ``kept_rows``: a prompt resembling a benchmark question is left out, as training leaves it
    out, and a folder without shards is a one-line error."""
    from tools.ngram_store import answers
    from tools.target_answers import prompts_of
    from tools.train_draft import kept_rows

    rows = [{"prompt": [1, 2], "text": "Name three colours.", "tokens": torch.tensor([5, 6])},
            {"prompt": [3], "text": "Compose an engaging travel blog post about a recent trip.",
             "tokens": torch.tensor([7])},
            {"prompt": [1, 2], "text": "Name three colours.", "tokens": torch.tensor([8])}]
    (tmp_path / "d").mkdir()
    torch.save({"rows": rows}, tmp_path / "d" / "shard-0000.pt")
    kept = kept_rows([tmp_path / "d"])
    assert [r["tokens"].tolist() for r in kept] == [[5, 6], [8]]  # the MT-Bench lookalike out
    assert answers([tmp_path / "d"]) == [[5, 6], [8]]
    assert prompts_of([tmp_path / "d"]) == [[1, 2]]
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no shard-"):
        kept_rows([tmp_path / "empty"])
