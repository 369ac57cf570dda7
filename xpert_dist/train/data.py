"""Training and calibration tensors for a run, and the seeded order in which ranks read them.

Every rank builds the same tensors (tokenisation is deterministic), then reads its own rows of each
global batch, so a run's data order does not depend on the number of ranks: the global batch of
optimizer step k is the same rows whether 1 rank reads ``world × batch`` rows or each of ``world``
ranks reads ``batch``.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..data import sources, tokenize
from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    input_ids: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N, L], -100 where no loss
    attention_mask: torch.Tensor  # [N, L]
    calib_ids: torch.Tensor  # [n, Lc]
    sha256: str  # of the token tensors: a data fingerprint for the manifest

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def _fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def build_train_data(cfg: RunConfig, tokenizer, model_max: int | None) -> TrainData:
    d = cfg.data
    tokenize.check_seq_len(d.seq_len, model_max, "data.seq_len")
    calib_len = d.calib_seq_len or d.seq_len
    tokenize.check_seq_len(calib_len, model_max, "data.calib_seq_len")
    ds = sources.load_records(d.train, d.train_split)
    fmt = sources.detect_format(ds, d)
    if fmt == "prompt_completion":
        pairs = sources.prompt_completion_pairs(ds, d, limit=d.max_train_samples)
        input_ids, labels, attention = tokenize.encode_prompt_completion(pairs, tokenizer, d.seq_len)
        calib_texts = [p + c for p, c in pairs]
    else:
        texts = sources.texts_of(ds, d, limit=d.max_train_samples)
        input_ids = tokenize.pack_texts(texts, tokenizer, d.seq_len)
        labels, attention = input_ids.clone(), torch.ones_like(input_ids)
        calib_texts = texts
    if d.calibration is not None:
        calib_texts = sources.texts_of(sources.load_records(d.calibration), d)
    calib = tokenize.calibration_batch(calib_texts, tokenizer, d.calib_samples, calib_len, d.seed)
    log.info("training data %s (%s): %d sequences of %d tokens; calibration %d x %d", d.train, fmt,
             input_ids.shape[0], d.seq_len, calib.shape[0], calib_len)
    return TrainData(input_ids, labels, attention, calib, _fingerprint(input_ids, labels, calib))


def steps_per_epoch(n_rows: int, cfg: RunConfig, world_size: int) -> int:
    per_step = cfg.train.batch_size * cfg.train.grad_accum * world_size
    n = n_rows // per_step
    if n == 0:
        raise ConfigError(f"{n_rows} training sequences are fewer than one optimizer step needs "
                          f"(batch_size {cfg.train.batch_size} x grad_accum {cfg.train.grad_accum} x {world_size} ranks)")
    return n


def epoch_order(n_rows: int, epoch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=g)


def micro_batches(data: TrainData, order: torch.Tensor, step_in_epoch: int, cfg: RunConfig,
                  rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of one optimizer step (``grad_accum`` of them)."""
    bs, ga = cfg.train.batch_size, cfg.train.grad_accum
    global_rows = order[step_in_epoch * bs * ga * world_size:(step_in_epoch + 1) * bs * ga * world_size]
    out = []
    for a in range(ga):
        chunk = global_rows[a * bs * world_size:(a + 1) * bs * world_size]
        rows = chunk[rank * bs:(rank + 1) * bs]
        out.append({"input_ids": data.input_ids[rows], "labels": data.labels[rows],
                    "attention_mask": data.attention_mask[rows]})
    return out
