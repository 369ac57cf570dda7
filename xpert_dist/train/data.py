"""Training and calibration tensors for a run, and the seeded order in which ranks read them.

``train.batch_size`` is the GLOBAL batch: the rows of one optimizer step, all ranks together.
Every rank builds the same tensors (tokenisation is deterministic) and the same seeded epoch
order; step ``k`` takes rows ``[k·B, (k+1)·B)`` of that order, rank ``r`` reads its contiguous share
``[r·B/W, (r+1)·B/W)`` of them in forwards of ``micro`` rows (:func:`batch_split`). The rows of a
step therefore do not depend on the number of ranks, and neither does the loss: every forward's
token losses are summed and divided by the token count of the whole global batch
(``num_items``), so the step's loss and gradient are the global token mean for any split.

Forward ``j`` of the step (counting over all ranks in order) is *leaf* ``j``; in the
reproducibility mode (``train.reproducible``) its gradient is a leaf of the canonical pairwise
tree (:mod:`xpert_dist.stats.tree`), which makes the summed gradient bit-identical for every
world size.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from ..config import RunConfig, TrainConfig
from ..data import sources, tokenize
from ..errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    input_ids: torch.Tensor  # [N, L]
    labels: torch.Tensor  # [N, L], -100 where no loss
    attention_mask: torch.Tensor  # [N, L]
    calib_ids: torch.Tensor  # [n · sets, Lc]: data.calib_sets draws of n windows, in order
    sha256: str  # of the token tensors: a data fingerprint for the manifest
    calib_sets: int = 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def calibration(self, k: int) -> torch.Tensor:
        """The windows prune step ``k`` (0-based) calibrates on: draw ``k mod calib_sets``."""
        n = self.calib_ids.shape[0] // self.calib_sets
        j = k % self.calib_sets
        return self.calib_ids[j * n:(j + 1) * n]


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
    # one seeded draw of every set's windows: the first set is the windows calib_sets=1 draws
    calib = tokenize.calibration_batch(calib_texts, tokenizer, d.calib_samples * d.calib_sets, calib_len, d.seed)
    log.info("training data %s (%s): %d sequences of %d tokens; calibration %d x %d%s", d.train, fmt,
             input_ids.shape[0], d.seq_len, d.calib_samples, calib_len,
             f" in each of {d.calib_sets} draws" if d.calib_sets > 1 else "")
    return TrainData(input_ids, labels, attention, calib, _fingerprint(input_ids, labels, calib), d.calib_sets)


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's global batch is split over ranks and forwards."""

    global_batch: int  # rows per optimizer step, all ranks together (train.batch_size)
    world_size: int
    per_rank: int  # rows each rank reads per step
    micro: int  # rows per forward (a leaf in the reproducibility mode)
    reproducible: bool = False

    @property
    def accum(self) -> int:
        """Forwards per rank per optimizer step (gradient accumulation)."""
        return self.per_rank // self.micro

    @property
    def n_leaves(self) -> int:
        """Forwards per optimizer step over all ranks (the leaves of the gradient tree)."""
        return self.global_batch // self.micro


def batch_split(t: TrainConfig, world_size: int) -> BatchSplit:
    """Per-rank rows and forward size for ``world_size`` ranks; ConfigError when it cannot be split.

    Default mode: ``micro = train.micro_batch_size`` (unset: the whole per-rank share in one
    forward). Reproducibility mode: ``micro = train.micro_batch_size`` or 1 row, the same fixed
    leaf shape on every world size.
    """
    B = t.batch_size
    if B % world_size:
        raise ConfigError(f"train.batch_size={B} is the global batch (rows per optimizer step, all ranks "
                          f"together) and cannot be split evenly over {world_size} ranks; use a multiple of {world_size}")
    per_rank = B // world_size
    micro = t.micro_batch_size or (1 if t.reproducible else per_rank)
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro}{' (the leaf size)' if t.reproducible else ''} does not "
                          f"divide the {per_rank} rows per rank per step (train.batch_size={B} over "
                          f"{world_size} ranks)")
    return BatchSplit(B, world_size, per_rank, micro, bool(t.reproducible))


def calibration_batch(t: TrainConfig) -> int:
    """Rows per calibration forward in prune steps: the same on every world size (so one-shot masks
    do not depend on it): ``train.micro_batch_size``, else 1 row in the reproducibility mode,
    else ``train.batch_size``."""
    return t.micro_batch_size or (1 if t.reproducible else t.batch_size)


def steps_per_epoch(n_rows: int, cfg: RunConfig, world_size: int) -> int:
    split = batch_split(cfg.train, world_size)
    n = n_rows // split.global_batch
    if n == 0:
        raise ConfigError(f"{n_rows} training sequences are fewer than one optimizer step needs "
                          f"(train.batch_size={split.global_batch}, the global batch)")
    return n


def epoch_order(n_rows: int, epoch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=g)


@dataclass
class StepBatch:
    """This rank's forwards of one optimizer step, with what the loss and the gradient tree need."""

    micro: list[dict[str, torch.Tensor]]  # one dict of model inputs per forward
    leaves: list[int]  # global leaf index of each forward (0..n_leaves-1 over all ranks)
    n_leaves: int
    num_items: int  # loss tokens in the whole global batch (labels != -100 after the shift), >= 1

    def __len__(self) -> int:
        return len(self.micro)

    def __iter__(self):
        return iter(self.micro)


def loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a causal LM batch (the label shift drops each row's first label)."""
    return int((labels[:, 1:] != -100).sum())


def micro_batches(data: TrainData, order: torch.Tensor, step_in_epoch: int, cfg: RunConfig,
                  rank: int, world_size: int) -> StepBatch:
    """This rank's forwards of one optimizer step (``accum`` of them, ``micro`` rows each)."""
    split = batch_split(cfg.train, world_size)
    B, m = split.global_batch, split.micro
    global_rows = order[step_in_epoch * B:(step_in_epoch + 1) * B]
    first = rank * split.accum
    out, leaves = [], []
    for j in range(first, first + split.accum):
        rows = global_rows[j * m:(j + 1) * m]
        out.append({"input_ids": data.input_ids[rows], "labels": data.labels[rows],
                    "attention_mask": data.attention_mask[rows]})
        leaves.append(j)
    return StepBatch(out, leaves, split.n_leaves, max(1, loss_tokens(data.labels[global_rows])))
