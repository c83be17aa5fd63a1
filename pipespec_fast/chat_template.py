"""Rendering a chat template without ``transformers`` (for :mod:`pipespec_fast.tokenizer`).

A chat template is Jinja code from the model folder. ``transformers`` renders it in a sandboxed
Jinja environment with particular whitespace settings and a few helpers; the same template in
another environment can render other text (``trim_blocks`` alone changes every line break after
a tag), hence other prompt ids. This module builds that environment the same way (sandboxed,
``trim_blocks`` and ``lstrip_blocks``, the loop-control extension, ``tojson`` without HTML
escaping, ``raise_exception``, ``strftime_now``, ``dict`` and a namespace that refuses
underscore names) and renders the one call the engine makes: plain ``{role, content}`` string
messages, with or without the generation prompt, the special tokens as variables. Anything
else (tools, documents, continuing the last message, the ``{% generation %}`` tag) is left to
``transformers``: :class:`~pipespec_fast.tokenizer.FastTokenizer` hands such calls over.
``tests/test_tokenizer.py`` compares the rendered text and ids with ``transformers``.
"""

from __future__ import annotations

import json
from datetime import datetime


class TemplateUnsupported(Exception):
    """A template (or a call) this renderer does not reproduce: use ``transformers``."""


def compile_template(source: str):
    """The compiled template, or :class:`TemplateUnsupported` when it needs what this
    environment lacks (an unknown tag such as ``{% generation %}``) or does not parse."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Namespace(jinja2.utils.Namespace):
        """Jinja's ``namespace`` without underscore attributes (no way to CPython internals)."""

        def __init__(*args, **kwargs):  # Jinja's signature trick: ``namespace(self=...)`` works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore attributes on a namespace ({name!r})")

    class _Dict:
        """``dict(...)`` and ``dict.fromkeys`` for templates, nothing else of the type."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateUnsupported(str(e)) from None


def plain_messages(conversation) -> list[dict[str, str]] | None:
    """``conversation`` as a fresh list of ``{"role": str, "content": str}`` dicts (``None``
    values dropped, as ``transformers`` does), or ``None`` when it holds anything else (content
    blocks, tool calls, reasoning fields, which ``transformers`` renames, message objects):
    those are ``transformers``' to convert."""
    if not isinstance(conversation, (list, tuple)):
        return None
    out = []
    for message in conversation:
        if not isinstance(message, dict):
            return None
        kept = {k: v for k, v in message.items() if v is not None}
        if not set(kept) <= {"role", "content"} or \
                not all(type(v) is str for v in kept.values()):
            return None
        out.append(kept)
    return out


def render(template, messages: list[dict[str, str]], add_generation_prompt: bool,
           special_tokens: dict[str, str]) -> str:
    """The template's text for ``messages`` (from :func:`plain_messages`), with the variables
    ``transformers`` passes: no tools or documents, the special tokens by name."""
    return template.render(messages=messages, tools=None, documents=None,
                           add_generation_prompt=add_generation_prompt, **special_tokens)
