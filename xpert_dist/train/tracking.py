"""Live metrics of a run as TensorBoard event files (rank 0, ``<output_dir>/tensorboard``).

``open_tracker(cfg, rank)`` returns a `TensorBoardTracker` on rank 0 when ``train.tensorboard`` is
true (the default) and the ``tensorboard`` package is installed (``pip install -e '.[dev]'`` or
``'.[track]'``), otherwise a `NullTracker` that does nothing. Scalars, by optimizer step:

* ``train/loss`` (the step's loss, as in results.json's ``loss_history``), ``train/lr``,
  ``train/tokens_per_s`` (tokens of the global batch / wall time of the step, prune steps excluded),
  ``memory/peak_rss_mb`` (this process's high-water mark), ``memory/peak_accelerator_mb`` (CUDA only);
* per prune step, at the optimizer step it ran before (the final one at the last step):
  ``prune/seconds``, ``prune/target_sparsity``, ``prune/sparsity`` (mean over matrices),
  ``prune/mask_moved`` (mean share of each kept set that changed since the previous prune step;
  absent at the first) and ``prune/final`` (1 for the final step). The figures are the pruner's
  `StepReport` fields.

    tensorboard --logdir runs/          # every run's output_dir/tensorboard
"""
from __future__ import annotations

import logging
import resource
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class NullTracker:
    """No tracking (not rank 0, switched off, or tensorboard not installed)."""

    log_dir: Path | None = None

    def step(self, step: int, loss: float, lr: float, batch, world_size: int = 1, reports=(),
             prune_seconds: float = 0.0) -> None:
        pass

    def prune_reports(self, reports, step: int) -> None:
        pass

    def close(self, reports=(), step: int = 0) -> None:
        pass


class TensorBoardTracker(NullTracker):
    def __init__(self, log_dir: Path, logged: int = 0, prune_seconds: float = 0.0, flush_secs: int = 10):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)
        self._logged = logged  # prune reports already written (by the process this one resumes)
        self._t = time.perf_counter()
        self._prune_s = prune_seconds

    def step(self, step: int, loss: float, lr: float, batch, world_size: int = 1, reports=(),
             prune_seconds: float = 0.0) -> None:
        """After optimizer step ``step`` (1-based): ``batch`` is this rank's forwards (dicts of inputs),
        ``reports`` the pruner's reports so far (new ones ran before this step: written at ``step - 1``),
        ``prune_seconds`` the run's prune time so far (taken out of this step's time)."""
        self.prune_reports(reports, step - 1)
        now = time.perf_counter()
        seconds = now - self._t - (prune_seconds - self._prune_s)
        self._t, self._prune_s = now, prune_seconds
        tokens = sum(int(mb["attention_mask"].sum()) for mb in batch) * world_size
        w = self.writer
        w.add_scalar("train/loss", float(loss), step)
        w.add_scalar("train/lr", float(lr), step)
        if seconds > 0:
            w.add_scalar("train/tokens_per_s", tokens / seconds, step)
        w.add_scalar("memory/peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, step)
        if torch.cuda.is_available():
            w.add_scalar("memory/peak_accelerator_mb", torch.cuda.max_memory_allocated() / 2**20, step)

    def prune_reports(self, reports, step: int) -> None:
        """Write the reports not written yet, at optimizer step ``step``."""
        w = self.writer
        for rep in list(reports)[self._logged:]:
            w.add_scalar("prune/seconds", float(rep.seconds), step)
            w.add_scalar("prune/target_sparsity", float(rep.target_sparsity), step)
            if rep.sparsity:
                w.add_scalar("prune/sparsity", sum(rep.sparsity.values()) / len(rep.sparsity), step)
            if rep.moved:
                w.add_scalar("prune/mask_moved", sum(rep.moved.values()) / len(rep.moved), step)
            w.add_scalar("prune/final", float(bool(rep.final)), step)
            self._logged += 1

    def close(self, reports=(), step: int = 0) -> None:
        self.prune_reports(reports, step)
        self.writer.close()


def open_tracker(cfg, rank: int, logged: int = 0, prune_seconds: float = 0.0) -> NullTracker:
    """The tracker of this process (see the module docstring), opened just before the training loop;
    ``logged``: prune reports that a resumed run already wrote; ``prune_seconds``: the run's prune
    time so far (the loop passes its running total to `step`)."""
    if rank != 0 or not cfg.train.tensorboard:
        return NullTracker()
    try:
        tracker = TensorBoardTracker(Path(cfg.output_dir) / "tensorboard", logged=logged,
                                     prune_seconds=prune_seconds)
    except ImportError:
        log.info("tensorboard is not installed: no event files (pip install tensorboard, or train.tensorboard=false)")
        return NullTracker()
    log.info("TensorBoard events in %s", tracker.log_dir)
    return tracker
