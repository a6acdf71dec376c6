"""Batched text generation where each row has its own adapter, sampling, stops and stream.

One call of transformers' ``generate`` serves a batch of requests: PEFT routes each row
to its release's adapter, `RowSampling` applies each row's temperature and nucleus (top-p,
Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration") bound, and
`RowStops` follows every row after each generated token: it decodes the row, ends it at
its end-of-sequence token, its first stop string or its token budget, and hands the new
text to the row's stream. Text that could still turn out to be the start of a stop string
is held back, so a stream never shows a stop string (OpenAI's ``stop`` semantics).

    rows = [Row(prompt_ids=ids, sampling=Sampling(max_tokens=16, temperature=0.0))]
    run_generate(model, tokenizer, rows, device=torch.device("cpu"))
    rows[0].result()        # Completion(text=..., finish_reason="length", ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessor, StoppingCriteria

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH = "stop", "length"
MIN_TEMPERATURE = 1e-5  # vLLM's _SAMPLING_EPS: below it, sampling is greedy


@dataclass(frozen=True)
class Sampling:
    """How one row is decoded: OpenAI's max_tokens, temperature (0: greedy), top_p, stop."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(eq=False)
class Row:
    """One prompt being continued; ``on_text`` receives each new piece of text."""

    prompt_ids: list[int]
    sampling: Sampling
    on_text: Callable[[str], None] | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of ``text`` handed to ``on_text``
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    def push(self, token: int, *, eos: frozenset[int], decode: Callable[[list[int]], str]) -> None:
        """Take the next generated token; end the row when it is due."""
        if token in eos:
            self.finish_reason = FINISH_STOP
        else:
            self.tokens.append(token)
            self.text = decode(self.tokens)
            cut = min((i for s in self.sampling.stop if (i := self.text.find(s)) >= 0), default=-1)
            if cut >= 0:
                self.text, self.finish_reason = self.text[:cut], FINISH_STOP
            elif len(self.tokens) >= self.sampling.max_tokens:
                self.finish_reason = FINISH_LENGTH
        self._emit()

    def _emit(self) -> None:
        end = len(self.text) if self.done else self._safe_end()
        if self.on_text is not None and end > self.sent:
            try:
                self.on_text(self.text[self.sent : end])
            except Exception:  # the stream's reader is gone: end this row, not the batch
                log.warning("a stream failed; its row stops", exc_info=True)
                self.on_text, self.cancelled = None, True
        self.sent = max(self.sent, end)

    def _safe_end(self) -> int:
        """Length of the text that can be shown: not a partial character, nor what could
        still become a stop string."""
        text = self.text.removesuffix("\ufffd")  # a multi-byte character cut in half
        held = 0
        for stop in self.sampling.stop:
            for k in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:k]):
                    held = k
                    break
        return len(text) - held

    def result(self) -> Completion:
        return Completion(
            text=self.text,
            finish_reason=self.finish_reason or FINISH_STOP,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.tokens),
        )


class RowSampling(LogitsProcessor):
    """Per-row temperature and top-p; greedy rows keep only their argmax.

    A temperature below `MIN_TEMPERATURE` is greedy, as in vLLM: dividing by a smaller one
    only rounds away the distribution. Logits are shifted so that their maximum is 0 before
    they are divided, so no temperature can overflow them to +inf; a row whose scores still
    leave nothing to sample (NaN or no finite logit) falls back to its argmax, so that one
    row can never make the batch's ``torch.multinomial`` fail for every row.
    """

    def __init__(self, rows: Sequence[Row], device: torch.device) -> None:
        temperature = torch.tensor([r.sampling.temperature for r in rows], device=device)
        self.greedy = temperature < MIN_TEMPERATURE
        self.temperature = torch.where(self.greedy, 1.0, temperature)
        self.top_p = torch.tensor([r.sampling.top_p for r in rows], device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        inf = float("inf")
        scores = scores.float().nan_to_num(nan=-inf, posinf=inf, neginf=-inf)  # (batch, vocab)
        best = torch.full_like(scores, float("-inf"))
        best.scatter_(-1, scores.argmax(dim=-1, keepdim=True), 0.0)
        shifted = scores - scores.amax(dim=-1, keepdim=True)  # <= 0, or NaN if inf - inf
        scaled = shifted / self.temperature[:, None]
        ordered, order = scaled.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # drop a token once the tokens before it already hold top_p of the mass (keeps >= 1)
        drop = probs.cumsum(dim=-1) - probs > self.top_p[:, None]
        ordered = ordered.masked_fill(drop, float("-inf"))
        nucleus = torch.empty_like(scaled).scatter_(-1, order, ordered)
        usable = (nucleus == 0).any(dim=-1) & ~nucleus.isnan().any(dim=-1)  # the max is 0
        return torch.where((self.greedy | ~usable)[:, None], best, nucleus)  # type: ignore[return-value]


class RowStops(StoppingCriteria):
    """Called by ``generate`` after every token: feeds each row, says which rows are done."""

    def __init__(self, rows: Sequence[Row], tokenizer: Any, eos: frozenset[int]) -> None:
        self.rows = rows
        self.eos = eos
        self.decode = lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True))

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.done:
                row.push(token, eos=self.eos, decode=self.decode)
        done = [row.done for row in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


def eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured, tokenizer.eos_token_id]
    return frozenset(int(i) for i in ids if i is not None)


def run_generate(model: Any, tokenizer: Any, rows: Sequence[Row], *, device: torch.device) -> None:
    """Continue every row's prompt in one batched ``generate`` call (left padding).

    The caller routes rows to adapters (see `clients.edge.runtime`); this function only
    decodes. Rows end by themselves; the call ends when every row has.
    """
    width = max(len(r.prompt_ids) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows],
                             dtype=torch.long)  # fmt: skip
    mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows],
                        dtype=torch.long)  # fmt: skip
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max(r.sampling.max_tokens for r in rows),
        do_sample=any(r.sampling.temperature >= MIN_TEMPERATURE for r in rows),
        temperature=1.0,  # RowSampling does it per row
        top_k=0,
        top_p=1.0,
        pad_token_id=pad,
        eos_token_id=sorted(eos) or None,
    )
    model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        logits_processor=[RowSampling(rows, device)],
        stopping_criteria=[RowStops(rows, tokenizer, eos)],
    )
    for row in rows:  # a row the token budget of the whole call ended
        if row.finish_reason is None:
            row.finish_reason = FINISH_LENGTH
            row._emit()
