"""The PipeSpec messages as tensors, for ``torch.distributed`` point-to-point links.

A message is a fixed ``int64[8]`` header followed by its payload tensors: the control part
(tokens, text) on the link's gloo group, in order, then its rows on the link's row route
(``payload.py``: the same gloo group, or a group of their own, NCCL between two GPUs), which
keeps them in order too. The header announces every tensor that follows, so the receiver
knows what to receive, and where:

* ``int64[n]`` tokens, each packed with its two flags (``TOKEN_BITS`` bits of id, then
  "has a row" and "a guess"), so a Chunk's tokens, confidence and row layout cost 8 bytes a
  token;
* the ``m`` probability rows a Chunk carries, one ``[V]`` tensor each (sampling only; in
  their own dtype, bit for bit: the stage above accepts against exactly the row a draft was
  drawn from). Sent as they are, not stacked: a copy of ``m`` rows of ``V`` values is a
  parallel torch op, whose fork-join measured 31 ms for 4 x 49152 floats on 2 cores busy
  with another process (25 us on one thread);
* ``uint8[b]`` UTF-8 text (a failure's stage and message).

Besides Chunk / Sync / Wanted (``messages.py``), links carry their own control messages:
``Heartbeat`` (nothing sent for a while: "still alive"), ``Finish`` (the target's final
tokens; the last message on a link), ``End`` (the last message on a link) and ``Fail`` (a
stage failed: who and why; also the last message).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipespec_fast.decoding.span import TokenSpan
from pipespec_fast.pipespec.messages import Chunk, Sync, Wanted

HEADER = 8
TOKEN_BITS = 40
_ROW_FLAG = 1 << TOKEN_BITS
_GUESS_FLAG = 1 << (TOKEN_BITS + 1)
_ID_MASK = _ROW_FLAG - 1
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing else was sent on this link for a while; the sender is alive."""


@dataclass(slots=True)
class Finish:
    """Target -> down the chain: the generation is over; ``tokens`` are its new tokens (the
    result every rank returns). No more messages follow on this link."""

    tokens: list[int]


@dataclass(frozen=True, slots=True)
class End:
    """No more messages follow on this link (this generation)."""


@dataclass(slots=True)
class Fail:
    """A stage failed (``stage``: its label, ``message``: the error's first line); every rank
    forwards it and raises. No more messages follow on this link."""

    stage: str
    message: str


HEARTBEAT, END = Heartbeat(), End()
KINDS = (Chunk, Sync, Wanted, Heartbeat, Finish, End, Fail)
_KIND = {cls: i for i, cls in enumerate(KINDS)}
TERMINAL = (Finish, End, Fail)


def encode(msg) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors to send for ``msg``: its control part (the header first), and the rows a
    Chunk carries, flat and where they are (the row route moves them: ``payload.py``)."""
    head = [0] * HEADER
    head[0] = _KIND[type(msg)]
    out: list[torch.Tensor] = []
    flat: list[torch.Tensor] = []
    if isinstance(msg, Chunk):
        head[1] = msg.start
        toks, rows = _pack_span(msg.span)
        head[2] = len(toks)
        out.append(torch.tensor(toks, dtype=torch.int64))
        if rows:
            flat = [x.reshape(-1) for x in rows]
            head[3], head[4], head[5] = len(flat), flat[0].numel(), DTYPES.index(flat[0].dtype)
    elif isinstance(msg, (Sync, Finish)):
        head[1] = getattr(msg, "start", 0)
        head[2] = len(msg.tokens)
        out.append(torch.tensor(msg.tokens, dtype=torch.int64))
    elif isinstance(msg, Wanted):
        head[1] = int(msg.wanted)
    elif isinstance(msg, Fail):
        text = f"{msg.stage}\n{msg.message}".encode()
        head[6] = len(text)
        out.append(torch.frombuffer(bytearray(text), dtype=torch.uint8))
    return [torch.tensor(head, dtype=torch.int64)] + [t for t in out if t.numel()], flat


Shapes = list[tuple[tuple[int, ...], torch.dtype]]


def payload_shapes(head: torch.Tensor) -> tuple[Shapes, Shapes]:
    """What follows ``head``, in order: the control tensors, then the rows (what the receiver
    allocates, and on which route it receives each)."""
    kind, _, n, m, v, dt, b, _ = head.tolist()
    control = []
    if KINDS[kind] in (Chunk, Sync, Finish) and n:
        control.append(((n,), torch.int64))
    if b:
        control.append(((b,), torch.uint8))
    return control, [((v,), DTYPES[dt])] * m


def decode(head: torch.Tensor, control: list[torch.Tensor], rows: list[torch.Tensor],
           device: torch.device | None = None):
    """The message ``head``, its ``control`` tensors and its ``rows`` carry; rows are put on
    ``device`` (a no-op for rows received there)."""
    kind, a, n, *_ = head.tolist()
    cls = KINDS[kind]
    toks = control[0].tolist() if n else []
    if cls is Chunk:
        if device is not None:
            rows = [r.to(device) for r in rows]
        return Chunk(a, _unpack_span(toks, rows))
    if cls is Sync:
        return Sync(a, toks)
    if cls is Finish:
        return Finish(toks)
    if cls is Wanted:
        return Wanted(bool(a))
    if cls is Fail:
        stage, _, message = bytes(control[-1].tolist()).decode(errors="replace").partition("\n")
        return Fail(stage, message)
    return cls()


def _pack_span(span: TokenSpan) -> tuple[list[int], list[torch.Tensor]]:
    rows = [r for r in span.rows if r is not None]
    if any(r.numel() == 0 for r in rows):  # (decoding.sampling.POINT_MASS)
        raise ValueError("a Chunk between processes carries a point-mass row marker: model-free "
                         "drafters run inline in their verifier's process, never as a rank")
    toks = [t | (_ROW_FLAG if r is not None else 0) | (0 if c else _GUESS_FLAG)
            for t, r, c in zip(span.tokens, span.rows, span.confident, strict=True)]
    return toks, rows


def _unpack_span(packed: list[int], rows: list[torch.Tensor]) -> TokenSpan:
    tokens, out_rows, confident, j = [], [], [], 0
    for p in packed:
        tokens.append(p & _ID_MASK)
        confident.append(not p & _GUESS_FLAG)
        if p & _ROW_FLAG:
            out_rows.append(rows[j])
            j += 1
        else:
            out_rows.append(None)
    return TokenSpan(tokens, out_rows, confident)
