"""Log-likelihood multiple choice (lm-eval-harness convention) for PubMedQA and CaseHOLD.

An item is a prompt and several options; each option is scored by the summed log-probability of its
tokens as a continuation of the prompt. ``acc``: the option with the largest sum is right; ``acc_norm``:
the largest sum divided by the option's length in characters. Ties go to the first option.

Scoring is batched, ``batch_size`` items per right-padded forward, and an item's prompt is computed once:
its row holds the prompt followed by every option's continuation, each continuation attending to the
prompt and to itself only (a block-causal 4D attention mask; positions restart after the prompt), so a
CaseHOLD item costs one prompt plus five holdings instead of five prompts. The continuation tokens'
log-probabilities are gathered from that row; they equal one forward per option up to float rounding
(tests/eval/test_multiple_choice.py, float64 reference). Items whose options see different prompt tokens
(the left cut for ``max_len`` differs per option) and models on attention kernels without custom masks
(e.g. flash-attention-2) take one row per option instead (options whose input is identical share one).
Items are processed longest first (less padding) and reported in input order. Prompts too long for
``max_len`` are cut from the left.
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


def _packed(per_item) -> tuple[list[int], list[list[int]]] | None:
    """(shared head, continuations) of an item whose options all see the same tokens before their first
    scored position, else None. The head's last token predicts each continuation's first token."""
    heads = {tuple(inp[: len(inp) - n + 1]) for inp, n, _ in per_item}
    if len(heads) != 1:
        return None
    return list(heads.pop()), [cont for _, _, cont in per_item]


def _attention(model) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None)


def _custom_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """The block-causal mask as the model's attention takes it: boolean for SDPA (True: attend), additive
    (0 / dtype minimum, in the hidden states' dtype) for eager attention."""
    if _attention(model) != "eager":
        return allowed
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = emb.weight.dtype if emb is not None else torch.float32
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)


def _packs_ok(model) -> bool:
    """Whether the model's attention honours a custom 4D mask (eager, SDPA; not flash-attention)."""
    return _attention(model) in (None, "eager", "sdpa")


def _score_packed(model, packs, pad: int, device, keep_ok: bool) -> list[list[float]]:
    """Per packed item (head, continuations): each continuation's summed log-probability, from one row
    ``head + cont_1[:-1] + cont_2[:-1] + ...`` with a block-causal mask."""
    layouts, rows = [], []
    for head, conts in packs:
        ids, pos, seg = list(head), list(range(len(head))), [-1] * len(head)  # seg -1: the shared head
        starts = []
        for j, cont in enumerate(conts):
            starts.append(len(ids))
            ids += cont[:-1]
            pos += range(len(head), len(head) + len(cont) - 1)
            seg += [j] * (len(cont) - 1)
        layouts.append((len(head), starts))
        rows.append((ids, pos, seg))
    width = max(len(ids) for ids, _, _ in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), 1, width, width), dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for r, (ids, pos, seg) in enumerate(rows):
        n = len(ids)
        ids_t[r, :n] = torch.tensor(ids, dtype=torch.long)
        pos_t[r, :n] = torch.tensor(pos, dtype=torch.long)
        s = torch.tensor(seg)
        same = (s[:, None] == s[None, :]) | (s[None, :] == -1)  # own segment or the head
        allowed[r, 0, :n, :n] = same & causal[:n, :n]
        idx = torch.arange(n, width)
        allowed[r, 0, idx, idx] = True  # padding attends to itself (no empty softmax row)
    mask = _custom_mask(model, allowed)
    first = min(h - 1 for h, _ in layouts)  # earliest position whose logits are needed
    kwargs = {"logits_to_keep": width - first} if keep_ok else {}
    logits = logits_of(model, ids_t.to(device), mask.to(device), position_ids=pos_t.to(device), **kwargs)
    offset = width - logits.size(1)
    out = []
    for r, ((head_len, starts), (_, conts)) in enumerate(zip(layouts, packs)):
        sums = []
        for start, cont in zip(starts, conts):
            where = [head_len - 1] + list(range(start, start + len(cont) - 1))
            sel = torch.tensor(where, device=logits.device) - offset
            logp = torch.log_softmax(at_least_fp32(logits[r, sel]), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=logp.device).unsqueeze(-1)
            sums.append(float(logp.gather(-1, target).double().sum()))
        out.append(sums)
    return out


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
    pack_ok = _packs_ok(model)
    scores: list[list[float]] = [[] for _ in items]
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for s in tqdm(starts, desc="multiple choice", unit="batch", disable=not progress, leave=False):
                chunk = order[s: s + batch_size]
                packs = {i: _packed(requests[i]) for i in chunk} if pack_ok else {}
                packed = [i for i in chunk if packs.get(i) is not None]
                if packed:
                    for i, sums in zip(packed, _score_packed(model, [packs[i] for i in packed], pad, device,
                                                             keep_ok)):
                        scores[i] = sums
                rest = [i for i in chunk if i not in packed]
                if rest:
                    rows = [row for i in rest for row in requests[i]]
                    sums = iter(_score_batch(model, rows, pad, device, keep_ok))
                    for i in rest:
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
