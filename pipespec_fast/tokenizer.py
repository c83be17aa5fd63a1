"""``FastTokenizer``: a model folder's tokenizer on the ``tokenizers`` library alone.

Why: importing ``transformers`` to get a tokenizer costs ~110 MB of resident memory (its
modules, and the ``accelerate``, ``huggingface_hub`` and ``sympy`` they pull in), more than the
default target's weights. The ids come from the Rust ``tokenizers.Tokenizer`` either way: a
``transformers`` fast tokenizer is that object plus configuration. So where the configuration
cannot change the result, this class serves the same calls from the same object.

When it applies (:func:`light_problem` says why not, and ``loading.load_tokenizer`` then loads
the ``transformers`` tokenizer as before): a ``tokenizer.json``; a ``tokenizer_config.json``
naming the generic class (``TokenizersBackend`` / ``PreTrainedTokenizerFast``) with no key
outside :data:`PLAIN_KEYS`; every special token it names already a special added token of
``tokenizer.json`` with default flags (``transformers`` would otherwise add or alter it); no
``special_tokens_map.json`` / ``added_tokens.json`` / extra templates; at most 100,000 tokens
(``transformers`` patches some larger pre-tokenizers). Then ``encode``, ``decode``,
``get_vocab``, the special tokens and their ids are the ``transformers`` ones (``tests/
test_tokenizer.py`` compares them on the default tokenizer), and so is the chat template's
rendering (:mod:`pipespec_fast.chat_template`) for plain messages.

Anything else asked of it (tools in a chat, an attribute it does not define) is handed to the
``transformers`` tokenizer of the same folder, loaded on first need: slower, never different.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipespec_fast import chat_template

GENERIC_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
PLAIN_KEYS = frozenset({"backend", "tokenizer_class", "model_max_length",
                        "clean_up_tokenization_spaces", "chat_template", *SPECIAL_NAMES})
# files transformers would read for configuration this class does not model
_OTHER_FILES = ("special_tokens_map.json", "added_tokens.json", "chat_template.json",
                "additional_chat_templates", "tokenizer.model", "vocab.json", "merges.txt")
_MAX_VOCAB = 100_000
_DEFAULT_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                  "special": True}


def light_problem(folder: Path) -> str | None:
    """Why ``folder``'s tokenizer needs ``transformers`` (``None``: :class:`FastTokenizer`
    gives the same results). Reads the small JSON files only."""
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    present = [f for f in _OTHER_FILES if (folder / f).exists()]
    if present:
        return f"{present[0]} present"
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return "no readable tokenizer_config.json"
    if not isinstance(cfg, dict):
        return "tokenizer_config.json is not an object"
    extra = sorted(set(cfg) - PLAIN_KEYS)
    if extra:
        return f"tokenizer_config.json sets {extra[0]}"
    if cfg.get("tokenizer_class") not in GENERIC_CLASSES or \
            cfg.get("backend", "tokenizers") != "tokenizers":
        return f"tokenizer class {cfg.get('tokenizer_class')!r}"
    if cfg.get("clean_up_tokenization_spaces", False) is not False:
        return "clean_up_tokenization_spaces"
    if "chat_template" in cfg and ((folder / "chat_template.jinja").exists()
                                   or not isinstance(cfg["chat_template"], str)):
        return "chat template given twice or by name"
    return _special_problem(folder, cfg)


def _special_problem(folder: Path, cfg: dict) -> str | None:
    """The special tokens must be there already, as ``transformers`` would make them."""
    try:
        spec = json.loads((folder / "tokenizer.json").read_text())
        added = {t["content"]: t for t in spec.get("added_tokens") or []}
        size = len(spec["model"]["vocab"]) + sum(t["id"] >= len(spec["model"]["vocab"])
                                                 for t in added.values())
    except (OSError, ValueError, KeyError, TypeError):
        return "tokenizer.json not understood"
    if size > _MAX_VOCAB:
        return f"{size} tokens"
    for name in SPECIAL_NAMES:
        tok = cfg.get(name)
        if tok is None:
            continue
        entry = added.get(tok) if isinstance(tok, str) else None
        if entry is None or any(entry.get(k) != v for k, v in _DEFAULT_FLAGS.items()):
            return f"{name} {tok!r} is not a plain special token of tokenizer.json"
    return None


class FastTokenizer:
    """The ``transformers`` tokenizer calls the engine makes, on ``tokenizers`` alone (module
    doc; build with :meth:`from_folder` after :func:`light_problem` returned ``None``)."""

    def __init__(self, folder: Path, backend, config: dict, template: str | None) -> None:
        self.folder = folder
        self.backend = backend
        self.chat_template = template
        self._compiled = None
        self._full = None
        for name in SPECIAL_NAMES:
            setattr(self, name, config.get(name))

    @classmethod
    def from_folder(cls, folder: str | Path) -> FastTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        backend.no_truncation()  # what transformers' encode does (no truncation asked)
        backend.no_padding()
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text() if jinja.is_file() else cfg.get("chat_template")
        return cls(folder, backend, cfg, template)

    # ------------------------------------------------------------------ ids and text
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        if clean_up_tokenization_spaces:
            return self.full().decode(ids, skip_special_tokens=skip_special_tokens,
                                      clean_up_tokenization_spaces=True)
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {n: getattr(self, n) for n in SPECIAL_NAMES if getattr(self, n) is not None}

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, conversation, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = False, **kwargs):
        """The template's rendering of ``conversation`` (text when ``tokenize=False``, else its
        ids, encoded without special tokens; ``{"input_ids": ids}`` with ``return_dict``).
        Plain string messages are rendered here; any other argument or message goes to
        ``transformers``."""
        messages = chat_template.plain_messages(conversation)
        template = self._template() if messages is not None and not kwargs else None
        if template is None:
            return self.full().apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
                return_dict=return_dict, **kwargs)
        text = chat_template.render(template, messages, add_generation_prompt,
                                    self.special_tokens_map)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids

    def _template(self):
        """The compiled chat template (``None``: none, or one for ``transformers`` only)."""
        if self._compiled is None and self.chat_template:
            try:
                self._compiled = chat_template.compile_template(self.chat_template)
            except chat_template.TemplateUnsupported:
                self._compiled = False
        return self._compiled or None

    # ------------------------------------------------------------------ everything else
    def full(self):
        """The ``transformers`` tokenizer of the same folder (loaded on first use)."""
        if self._full is None:
            from pipespec_fast.loading import load_transformers_tokenizer

            self._full = load_transformers_tokenizer(self.folder)
        return self._full

    def __call__(self, *args, **kwargs):
        return self.full()(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("_") or name in ("backend", "folder"):
            raise AttributeError(name)
        return getattr(self.full(), name)

    def __repr__(self) -> str:
        return f"FastTokenizer({str(self.folder)!r}, {len(self)} tokens)"
