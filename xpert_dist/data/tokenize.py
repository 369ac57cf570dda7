"""Turn texts into model inputs: packed blocks, completion-only prompt/completion batches, calibration windows.

Works with any tokenizer that maps a list of strings to ``{"input_ids": [[...], ...]}`` when called with
``add_special_tokens=False`` and has ``eos_token_id`` (HF tokenizers, ``ByteTokenizer``). No BOS token is
added anywhere, so packed training blocks, calibration windows and evaluation windows are built alike.
"""
from __future__ import annotations

import random

import torch

from ..errors import ConfigError

IGNORE_INDEX = -100
_ENCODE_CHUNK = 64  # texts tokenised per call when only a prefix of the corpus is needed


def encode_texts(texts: list[str], tokenizer) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no eos_token_id; "
                          "it is needed to separate packed documents")
    return int(eos)


def pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else eos_id(tokenizer)


def check_seq_len(seq_len: int, model_max: int | None, name: str = "data.seq_len") -> int:
    """``seq_len`` if positive and within the model's context (``model_max`` None: no limit), else ConfigError."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"{name}={seq_len!r} must be a positive integer")
    if model_max is not None and seq_len > int(model_max):
        raise ConfigError(f"{name}={seq_len} exceeds the model's maximum context of {model_max} tokens "
                          "(max_position_embeddings)")
    return seq_len


def model_max_positions(model) -> int | None:
    """``config.max_position_embeddings`` of a HF (or peft-wrapped) model, or None when unknown."""
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else None


def pack_texts(texts: list[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate the texts' tokens with EOS between documents and cut the stream into ``seq_len`` blocks.

    The incomplete tail is dropped. With ``max_blocks`` only as many texts as needed are tokenised.
    Returns ``LongTensor[N, seq_len]``; ConfigError when not even one block fits.
    """
    check_seq_len(seq_len, None, "seq_len")
    if max_blocks is not None and max_blocks <= 0:
        raise ConfigError(f"max_blocks={max_blocks} must be positive (or None for all blocks)")
    eos = eos_id(tokenizer)
    need = None if max_blocks is None else max_blocks * seq_len
    stream: list[int] = []
    step = len(texts) if need is None else _ENCODE_CHUNK
    for start in range(0, len(texts), max(step, 1)):
        for ids in encode_texts(texts[start:start + step], tokenizer):
            if stream:
                stream.append(eos)
            stream.extend(ids)
        if need is not None and len(stream) >= need:
            break
    n_blocks = len(stream) // seq_len
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise ConfigError(f"texts hold {len(stream)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def encode_prompt_completion(pairs: list[tuple[str, str]], tokenizer, seq_len: int):
    """Right-padded ``(input_ids, labels, attention_mask)``, each ``[N, seq_len]``, for completion-only loss.

    Sequence = prompt tokens + completion tokens + EOS. ``labels`` equal ``input_ids`` on the completion
    (and its EOS) and are -100 on the prompt and the padding. Too long: the prompt is cut from the left;
    a completion longer than ``seq_len - 1`` keeps its first ``seq_len - 1`` tokens after one prompt token.
    """
    check_seq_len(seq_len, None, "seq_len")
    if not pairs:
        raise ConfigError("encode_prompt_completion got no (prompt, completion) pairs")
    eos, pad = eos_id(tokenizer), pad_id(tokenizer)
    prompts = encode_texts([p for p, _ in pairs], tokenizer)
    completions = encode_texts([c for _, c in pairs], tokenizer)
    n = len(pairs)
    input_ids = torch.full((n, seq_len), pad, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        c = c + [eos]
        if len(c) > seq_len - (1 if p else 0):
            c = c[: seq_len - (1 if p else 0)]
        p = p[len(p) - (seq_len - len(c)):] if len(p) + len(c) > seq_len else p
        seq = p + c
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[i, len(p): len(seq)] = torch.tensor(c, dtype=torch.long)
        attention[i, : len(seq)] = 1
    return input_ids, labels, attention


def _segments(docs: list[list[int]], seq_len: int, eos: int) -> list[list[int]]:
    """Documents longer than seq_len stay alone; runs of shorter neighbours are joined (EOS between) until
    they are; a short remainder at the end joins the previous segment."""
    segments: list[list[int]] = []
    current: list[int] = []
    for ids in docs:
        if not ids:
            continue
        if len(ids) > seq_len and not current:
            segments.append(ids)
            continue
        current = current + [eos] + ids if current else list(ids)
        if len(current) > seq_len:
            segments.append(current)
            current = []
    if current:
        if segments:
            segments[-1] = segments[-1] + [eos] + current
        elif len(current) >= seq_len:
            segments.append(current)
    return segments


def calibration_batch(texts: list[str], tokenizer, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``LongTensor[n_samples, seq_len]`` of seeded random windows, like Wanda's C4 calibration sampling.

    Each sample picks a document longer than ``seq_len`` at random and a random window in it. Documents
    that are too short are concatenated with their neighbours first, so short-text corpora (QA pairs)
    still yield windows. Deterministic given ``seed`` (Python's Mersenne Twister, not the global RNG).
    """
    check_seq_len(seq_len, None, "calib_seq_len")
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
        raise ConfigError(f"calib_samples={n_samples!r} must be a positive integer")
    docs = encode_texts(texts, tokenizer)
    segments = _segments(docs, seq_len, eos_id(tokenizer))
    if not segments:
        total = sum(len(d) for d in docs)
        raise ConfigError(f"calibration texts hold {total} tokens, fewer than calib_seq_len={seq_len}")
    rng = random.Random(seed)
    out = torch.empty((n_samples, seq_len), dtype=torch.long)
    for k in range(n_samples):
        seg = segments[rng.randrange(len(segments))]
        start = rng.randrange(len(seg) - seq_len + 1)
        out[k] = torch.tensor(seg[start: start + seq_len], dtype=torch.long)
    return out
