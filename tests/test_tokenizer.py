"""``FastTokenizer`` (``tokenizers`` alone) against the ``transformers`` tokenizer of the same
folder, the choice between them, and one tokenizer object shared by stages with identical
tokenizer files (``pipespec_fast.tokenizer``, ``pipespec_fast.loading``)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipespec_fast.loading import (
    load_tokenizer,
    load_tokenizers,
    load_transformers_tokenizer,
    tokenizer_key,
)
from pipespec_fast.tokenizer import FastTokenizer, light_problem

DRAFT = Path(__file__).resolve().parents[1] / "models" / "drafts" / "SmolLM2-135M-draft"
TEXTS = [
    "Write a Python function that checks whether a number is prime.",
    "  héllo wörld\n\tindented 123456 🤗 <|im_start|>user\nhi<|im_end|>",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "<|endoftext|><file_sep><|im_end|> trailing   spaces   ",
    "{{ not a template }} {% if x %}",
    "",
    "日本語のテキスト, ελληνικά, عربى",
]
CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": TEXTS[1]}],
    [{"role": "user", "content": "{{ messages }} {% endfor %}", "name": None}],
]


@pytest.fixture(scope="module")
def pair():
    return FastTokenizer.from_folder(DRAFT), load_transformers_tokenizer(DRAFT)


def _ids(x):
    return list(x["input_ids"] if hasattr(x, "keys") else x)


def test_default_tokenizer_loads_without_transformers():
    assert light_problem(DRAFT) is None
    assert isinstance(load_tokenizer(DRAFT), FastTokenizer)
    code = ("import sys\nfrom pipespec_fast.loading import load_tokenizer\n"
            f"t = load_tokenizer({str(DRAFT)!r})\n"
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}],\n"
            "                            add_generation_prompt=True)\n"
            "print(len(ids), t.decode(ids, skip_special_tokens=True)[:6], t.eos_token_id)\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["31", "system", "2"]


def test_same_ids_and_text_as_transformers(pair):
    fast, ref = pair
    for text in TEXTS:
        for special in (True, False):
            assert fast.encode(text, add_special_tokens=special) == \
                ref.encode(text, add_special_tokens=special)
        ids = ref.encode(text, add_special_tokens=False) + [0, 1, 2, 5]
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == \
                ref.decode(ids, skip_special_tokens=skip)
        assert fast.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) \
            == ref.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    assert fast.decode(7) == ref.decode(7)
    assert fast.get_vocab() == ref.get_vocab() and len(fast) == len(ref)
    assert fast.special_tokens_map == ref.special_tokens_map
    assert (fast.eos_token_id, fast.bos_token_id) == (ref.eos_token_id, ref.bos_token_id) == (2, 1)
    assert fast.chat_template == ref.chat_template


def test_same_chat_rendering_and_ids_as_transformers(pair):
    fast, ref = pair
    for chat in CHATS:
        for gen in (True, False):
            text = fast.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(chat, add_generation_prompt=gen,
                                                   tokenize=False)
            ids = fast.apply_chat_template(chat, add_generation_prompt=gen)
            assert ids == _ids(ref.apply_chat_template(chat, add_generation_prompt=gen))
            assert fast.apply_chat_template(chat, add_generation_prompt=gen,
                                             return_dict=True) == {"input_ids": ids}
    assert fast._full is None  # all of the above without transformers


RICH_TEMPLATE = """{%- set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ m['role'] }} {{ ns.n }}
{{ m['content'] | trim }}<|im_end|>
    {{ {'k': m['content'][:3], 'ü': 1} | tojson }}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant {{ eos_token }}{{ dict(a=1) | length }}
{% endif %}
"""


def test_whitespace_control_and_helpers_render_as_in_transformers(tmp_path):
    """A template leaning on what the environment decides (trim_blocks, lstrip_blocks, loop
    controls, namespace, tojson without HTML escaping, dict, the special tokens)."""
    folder = _copy(DRAFT, tmp_path / "rich")
    (folder / "chat_template.jinja").write_text(RICH_TEMPLATE)
    fast, ref = load_tokenizer(folder), load_transformers_tokenizer(folder)
    assert isinstance(fast, FastTokenizer)
    for chat in CHATS + [[{"role": "user", "content": "<b>&'\"</b>"}]]:
        for gen in (True, False):
            text = fast.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == ref.apply_chat_template(chat, add_generation_prompt=gen,
                                                   tokenize=False)
            assert fast.apply_chat_template(chat, add_generation_prompt=gen) == \
                _ids(ref.apply_chat_template(chat, add_generation_prompt=gen))
    assert fast._full is None


def test_other_calls_go_to_transformers(pair, tmp_path):
    fast, ref = pair
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    chat = [{"role": "user", "content": "hi"}]
    fresh = FastTokenizer.from_folder(DRAFT)
    assert _ids(fresh.apply_chat_template(chat, tools=tools)) == \
        _ids(ref.apply_chat_template(chat, tools=tools))
    assert fresh._full is not None
    assert fresh.convert_ids_to_tokens([5, 6]) == ref.convert_ids_to_tokens([5, 6])
    assert fresh("a b")["input_ids"] == ref("a b")["input_ids"]
    # a template tag only transformers knows ({% generation %}): rendered by transformers
    folder = _copy(DRAFT, tmp_path / "gen")
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% endfor %}")
    tok = load_tokenizer(folder)
    assert isinstance(tok, FastTokenizer)
    assert tok.apply_chat_template(chat, tokenize=False) == "hi"
    assert tok._full is not None


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / f, dst / f)
    return dst


def _edit_config(folder: Path, **kw) -> None:
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(kw)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, reason", [
    (dict(add_bos_token=True), "sets add_bos_token"),
    (dict(tokenizer_class="LlamaTokenizerFast"), "tokenizer class"),
    (dict(clean_up_tokenization_spaces=True), "clean_up"),
    (dict(eos_token="<|not_there|>"), "eos_token"),
    (dict(chat_template="{{ x }}"), "chat template given twice"),
])
def test_configurations_it_does_not_model_load_transformers(tmp_path, change, reason):
    folder = _copy(DRAFT, tmp_path / "t")
    _edit_config(folder, **change)
    assert reason in light_problem(folder)
    assert not isinstance(load_tokenizer(folder), FastTokenizer)


def test_special_tokens_map_file_loads_transformers(tmp_path):
    folder = _copy(DRAFT, tmp_path / "t")
    (folder / "special_tokens_map.json").write_text("{}")
    assert "special_tokens_map.json" in light_problem(folder)


def test_identical_tokenizer_files_share_one_object(tmp_path, monkeypatch):
    import pipespec_fast.loading as loading

    a, b = _copy(DRAFT, tmp_path / "a"), _copy(DRAFT, tmp_path / "b")
    c = _copy(DRAFT, tmp_path / "c")  # same vocabulary, another chat template: its own object
    (c / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    calls = []
    real = loading.load_tokenizer
    monkeypatch.setattr(loading, "load_tokenizer", lambda p: calls.append(p) or real(p))
    ta, tb, tc, none = load_tokenizers([a, b, c, tmp_path])
    assert ta is tb and tc is not ta and none is None
    assert calls == [a, c]
    assert tokenizer_key(a) == tokenizer_key(b) != tokenizer_key(c)
    assert tokenizer_key(tmp_path) is None
    # the key is the files' bytes, not their names: one byte changed makes another tokenizer
    cfg = (b / "tokenizer_config.json").read_bytes()
    (b / "tokenizer_config.json").write_bytes(cfg.replace(b"8192", b"8193"))
    assert tokenizer_key(a) != tokenizer_key(b)


def test_stages_with_identical_files_share_the_pipeline_tokenizer(tmp_path):
    from tiny import family, hf_state_of

    from pipespec_fast.loading import load_stages
    from pipespec_fast.models.checkpoint import save_state_dict

    draft, target = family(2, seed=5, vocab=49152, dim=16, n_heads=2, n_kv_heads=1, n_layers=1)
    dirs = []
    for name, model in (("draft", draft), ("target", target)):
        folder = _copy(DRAFT, tmp_path / name)
        save_state_dict(folder, hf_state_of(model), model.config)
        dirs.append(folder)
    stages, tok = load_stages(dirs, max_len=16)
    assert isinstance(tok, FastTokenizer) and tok.eos_token_id == 2
    # another vocabulary beside it is still refused
    other = tmp_path / "other"
    shutil.copytree(dirs[0], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["added_tokens"].append(dict(spec["added_tokens"][-1], id=49152, content="<extra>"))
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"vocab mismatch.*'other'.*'target'"):
        load_stages([other, dirs[1]], max_len=16)

