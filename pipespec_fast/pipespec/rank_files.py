"""What a rank of a distributed pipeline reads of the model folders: its own, and nothing else.

Ranks may be on different hosts, and a host should need only the folder of the model it runs.
So rank ``r`` checks and loads ``paths[r]`` alone, tokenizer included, and the ranks compare
what they found by gathering it (collectives on the whole group):

* :func:`together`: a step every rank runs on its own files (checking its folder, loading its
  model), after which every rank learns whether every rank succeeded. Without it, a rank that
  fails (a folder missing on its host) would leave the others waiting in the next collective
  until the group's timeout (30 minutes under ``torchrun``); with it, every rank raises at
  once, naming the rank and its error.
* :func:`rank_tokenizer`: this rank's tokenizer, checked against the target's as one process
  checks them (``loading.check_tokenizers``) but through digests: the tokenizer files' digest
  first (equal files: the same tokenizer), then, where files differ, the vocabularies'. Where
  this rank's files differ from the target's (the same vocabulary, another chat template,
  say) the target's folder is read too, if this host has it, so that every rank encodes a
  prompt as the target's rank does; if not, this rank's own is used, and a prompt encoded
  otherwise is refused by each generation's handshake.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


class RankError(RuntimeError):
    """Another rank failed a step every rank runs (its error's type and first line)."""


class RankUsageError(ValueError):
    """Another rank found a mistake in its arguments or files (a ``ValueError`` there)."""


def together(what: str, step: Callable[[], T]) -> T:
    """``step()`` on this rank, then a collective: if any rank failed, every rank raises (this
    rank its own error, the others one naming the first rank that failed and its error's
    first line; a ``ValueError`` there stays a ``ValueError``: a usage error)."""
    try:
        out, err = step(), None
    except Exception as e:  # whatever it is, every rank must reach the gather below
        out, err = None, e
    mine = None if err is None else (type(err).__name__, _first_line(err),
                                      isinstance(err, ValueError))
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if err is not None:
        raise err
    for r, e in enumerate(every):
        if e is not None:
            name, line, usage = e
            cls = RankUsageError if usage else RankError
            raise cls(f"distributed: rank {r} failed {what} ({name}: {line})")
    return out


def rank_tokenizer(paths: Sequence[str | Path], rank: int):
    """This rank's tokenizer (``None`` when the folders hold none), after checking that every
    rank's folder holds the target's vocabulary (a ``ValueError`` naming both, as in one
    process). A collective: every rank calls it with the same ``paths``."""
    from pipespec_fast.loading import load_tokenizer

    own, target = Path(paths[rank]), Path(paths[-1])
    key = together("reading its model folder", lambda: _tokenizer_key(own))
    keys = _gather(key)
    tok = together("loading its tokenizer", lambda: load_tokenizer(own))
    if any(k != keys[-1] for k in keys):  # every rank sees the same keys: the same branch
        vocabs = _gather(together("reading its vocabulary", lambda: vocab_digest(tok)))
        names = [Path(p).name for p in paths]
        for name, v in zip(names[:-1], vocabs[:-1], strict=True):
            if v != vocabs[-1]:
                raise ValueError(f"tokenizer vocab mismatch between stage {name!r} and target "
                                 f"{names[-1]!r}: all stages must share one tokenizer")
    # the same vocabulary in other files: encode as the target does, where this host can
    other = key != keys[-1] and target.is_dir()
    return together("loading the target's tokenizer",
                    lambda: load_tokenizer(target) if other else tok)


def _tokenizer_key(folder: Path) -> str | None:
    from pipespec_fast.loading import tokenizer_key

    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model folder on this host")
    return tokenizer_key(folder)


def vocab_digest(tok) -> str | None:
    """A digest of ``tok``'s vocabulary (token -> id), ``None`` without a tokenizer."""
    if tok is None:
        return None
    h = hashlib.sha256()
    for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
        h.update(f"{i}\0{token}\0".encode(errors="surrogatepass"))
    return h.hexdigest()


def _gather(obj) -> list:
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
