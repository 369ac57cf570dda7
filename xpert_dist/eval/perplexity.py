"""Perplexity of a causal LM on fixed token windows: exp(mean NLL over every predicted token).

Each window is scored independently (no state carried between windows); in a window of L tokens the
L-1 tokens after the first are predicted. Log-probabilities are computed in at least float32 (sums in float64)
from the model's logits, whatever the model's dtype. Works with HF models and peft-wrapped ones.
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from ..data.sources import load_records, texts_of
from ..data.tokenize import pack_texts
from ..config import DataConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)


def model_device(model) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-less stand-ins)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def logits_of(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
    """``model(...).logits`` (or the model's tensor output), without the KV cache."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out if isinstance(out, torch.Tensor) else out.logits


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 when it already is (half-precision log-softmax loses digits)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def window_nll(model, windows: torch.Tensor) -> tuple[float, int]:
    """(summed NLL of tokens 1..L-1 of every window, number of predicted tokens) for one batch."""
    logits = at_least_fp32(logits_of(model, windows)[:, :-1])
    targets = windows[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
    return float(nll.double().sum()), targets.numel()


def perplexity(model, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> float:
    """exp(mean token NLL) of ``model`` over ``windows`` (``LongTensor[N, L]``, L >= 2)."""
    from tqdm.auto import tqdm

    if windows.dim() != 2 or windows.size(1) < 2 or windows.size(0) == 0:
        raise ConfigError(f"perplexity needs windows of shape [N>0, L>=2], got {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ConfigError(f"perplexity batch_size={batch_size} must be positive")
    device = model_device(model)
    was_training = getattr(model, "training", False)
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            starts = range(0, windows.size(0), batch_size)
            for s in tqdm(starts, desc="perplexity", unit="batch", disable=not progress, leave=False):
                nll, n = window_nll(model, windows[s: s + batch_size].to(device))
                total += nll
                count += n
    finally:
        if was_training:
            model.train()
    ppl = math.exp(total / count)
    log.info("perplexity %.4f over %d windows x %d tokens (%d predicted)", ppl, windows.size(0),
             windows.size(1), count)
    return ppl


def heldout_windows(spec: str, tokenizer, seq_len: int, n_windows: int | None,
                    text_field: str = "text") -> torch.Tensor:
    """The first ``n_windows`` packed windows of ``spec``'s text (all windows when None).

    Deterministic: documents in stored order, EOS between them, so every run and every model (with the
    same tokenizer) scores the same tokens. Fewer windows than asked is logged, not an error.
    """
    ds = load_records(spec)
    texts = texts_of(ds, DataConfig(text_field=text_field))
    windows = pack_texts(texts, tokenizer, seq_len, max_blocks=n_windows)
    if n_windows is not None and windows.size(0) < n_windows:
        log.warning("%s holds only %d windows of %d tokens (asked for %d)", spec, windows.size(0), seq_len,
                    n_windows)
    return windows
