"""Log-likelihood multiple choice (lm-eval-harness convention) for PubMedQA and CaseHOLD.

An item is a prompt and several options; each option is scored by the summed log-probability of its
tokens as a continuation of the prompt. ``acc``: the option with the largest sum is right; ``acc_norm``:
the largest sum divided by the option's length in characters. Ties go to the first option.

Scoring is batched: all options of ``batch_size`` items go through the model in one right-padded forward
(options whose model input is identical share one row), and the continuation tokens' log-probabilities are
gathered from it. Items are processed longest first
(less padding) and reported in input order. Prompts too long for ``max_len`` are cut from the left.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from ..data.sources import HOLDING_MARKER
from ..data.tokenize import encode_texts, eos_id, model_max_positions, pad_id
from ..errors import ConfigError
from .perplexity import at_least_fp32, logits_of, model_device

log = logging.getLogger(__name__)

PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]


@dataclass(frozen=True)
class ChoiceItem:
    """Prompt, bare option texts, index of the right option; ``delimiter`` goes between prompt and option."""

    prompt: str
    options: tuple[str, ...]
    label: int
    delimiter: str = " "


def pubmedqa_items(ds) -> list[ChoiceItem]:
    """PubMedQA rows (question, context, answer) -> items with options yes/no/maybe (lm-eval's prompt)."""
    items = []
    for row in ds:
        answer = str(row["answer"]).strip().lower()
        if answer not in PUBMEDQA_OPTIONS:
            raise ConfigError(f"pubmedqa record {row.get('id')!r}: answer {row['answer']!r} is not one of "
                              f"{PUBMEDQA_OPTIONS}")
        prompt = f"Abstract: {row['context']}\nQuestion: {row['question']}\nAnswer:"
        items.append(ChoiceItem(prompt, tuple(PUBMEDQA_OPTIONS), PUBMEDQA_OPTIONS.index(answer)))
    return items


def casehold_items(ds) -> list[ChoiceItem]:
    """CaseHOLD rows (context, endings, label) -> items: the citing text up to ``(<HOLDING>)`` and ``" ("``,
    then each holding. A context without the marker is used whole (the holding then closes it)."""
    items = []
    for row in ds:
        context, endings, label = row["context"], list(row["endings"]), int(row["label"])
        if not 0 <= label < len(endings):
            raise ConfigError(f"casehold record {row.get('id')!r}: label {label} outside 0..{len(endings) - 1}")
        cut = context.find(HOLDING_MARKER)
        before = context[:cut] if cut >= 0 else context
        prompt = f"{before.rstrip()} (".lstrip()
        items.append(ChoiceItem(prompt, tuple(endings), label, delimiter=""))
    return items


# ----------------------------------------------------------------------------- encoding

def _encode_requests(tokenizer, items: list[ChoiceItem], max_len: int):
    """Per item, per option: (input ids, number of continuation tokens to score at its end).

    lm-eval's pair encoding: trailing whitespace of the prompt moves to the continuation, the whole string
    is encoded, and the continuation is what follows the encoded prompt. The input is the whole sequence
    minus its last token, cut from the left to ``max_len``.
    """
    contexts, wholes, shape = [], [], []
    for item in items:
        if not item.options:
            raise ConfigError(f"multiple-choice item has no options (prompt {item.prompt[:60]!r})")
        ctx = item.prompt
        moved = ctx[len(ctx.rstrip()):]
        ctx = ctx[: len(ctx) - len(moved)]
        contexts.append(ctx)
        wholes.extend(ctx + moved + item.delimiter + opt for opt in item.options)
        shape.append((moved, len(item.options)))
    ctx_ids = encode_texts(contexts, tokenizer)
    whole_ids = encode_texts(wholes, tokenizer)
    requests, k = [], 0
    for item, ctx_enc, (moved, n_opt) in zip(items, ctx_ids, shape):
        per_item = []
        for j in range(n_opt):
            whole = whole_ids[k]
            k += 1
            if ctx_enc:
                prefix, cont = ctx_enc, whole[len(ctx_enc):]
            else:  # empty prompt: condition on EOS, as lm-eval does
                prefix, cont = [eos_id(tokenizer)], whole
            if not cont:
                raise ConfigError(f"option {item.options[j]!r} encodes to no tokens after prompt "
                                  f"{item.prompt[-60:]!r}")
            if len(cont) > max_len:
                log.warning("option of %d tokens cut to its last %d (max_len)", len(cont), max_len)
                cont = cont[-max_len:]
            full = (prefix + cont)[-(max_len + 1):]
            per_item.append((full[:-1], len(cont), cont))
        requests.append(per_item)
    return requests


def _accepts_logits_to_keep(model) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError, AttributeError):
        return False


# ----------------------------------------------------------------------------- scoring

def _score_batch(model, rows, pad: int, device, keep_ok: bool) -> list[float]:
    """Summed continuation log-probabilities of each row (input ids, n scored, continuation ids).

    Rows with the same input (e.g. PubMedQA's one-token options yes/no/maybe after one prompt) share one
    forward: the model sees each distinct input once and each row gathers its own continuation tokens.
    """
    distinct: dict[tuple[int, ...], int] = {}
    for inp, _, _ in rows:
        distinct.setdefault(tuple(inp), len(distinct))
    inputs = list(distinct)
    width = max(len(inp) for inp in inputs)
    ids = torch.full((len(inputs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    for r, inp in enumerate(inputs):
        ids[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
        mask[r, : len(inp)] = 1
    first = min(len(inp) - n for inp, n, _ in rows)  # earliest position whose logits are needed
    kwargs = {"logits_to_keep": width - first} if keep_ok else {}
    logits = logits_of(model, ids.to(device), mask.to(device), **kwargs)
    offset = width - logits.size(1)
    sums = []
    for inp, n, cont in rows:
        end = len(inp) - offset
        logp = torch.log_softmax(at_least_fp32(logits[distinct[tuple(inp)], end - n: end]), dim=-1)
        target = torch.tensor(cont, dtype=torch.long, device=logp.device).unsqueeze(-1)
        sums.append(float(logp.gather(-1, target).double().sum()))
    return sums


def score_items(model, tokenizer, items: list[ChoiceItem], batch_size: int = 8, max_len: int | None = None,
                progress: bool = True) -> list[list[float]]:
    """Summed log-probability of every option of every item (input order), ``batch_size`` items per forward."""
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ConfigError(f"multiple-choice batch_size={batch_size} must be positive")
    if max_len is None:
        max_len = model_max_positions(model) or 2048
    if max_len < 2:
        raise ConfigError(f"multiple-choice max_len={max_len} must be at least 2")
    requests = _encode_requests(tokenizer, items, max_len)
    order = sorted(range(len(items)), key=lambda i: -max(len(inp) for inp, _, _ in requests[i]))
    device, pad, keep_ok = model_device(model), pad_id(tokenizer), _accepts_logits_to_keep(model)
    scores: list[list[float]] = [[] for _ in items]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for s in tqdm(starts, desc="multiple choice", unit="batch", disable=not progress, leave=False):
                chunk = order[s: s + batch_size]
                rows = [row for i in chunk for row in requests[i]]
                sums = iter(_score_batch(model, rows, pad, device, keep_ok))
                for i in chunk:
                    scores[i] = [next(sums) for _ in requests[i]]
    finally:
        if was_training:
            model.train()
    return scores


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))


def choice_accuracy(model, tokenizer, items: list[ChoiceItem], batch_size: int = 8, max_len: int | None = None,
                    progress: bool = True) -> dict:
    """``{"acc", "acc_norm", "n"}`` of ``model`` on ``items`` (max_len None: the model's context size)."""
    if not items:
        raise ConfigError("choice_accuracy got no items")
    scores = score_items(model, tokenizer, items, batch_size=batch_size, max_len=max_len, progress=progress)
    hits = norm_hits = 0
    for item, lls in zip(items, scores):
        hits += _argmax(lls) == item.label
        normed = [ll / max(len(opt), 1) for ll, opt in zip(lls, item.options)]
        norm_hits += _argmax(normed) == item.label
    n = len(items)
    return {"acc": hits / n, "acc_norm": norm_hits / n, "n": n}
