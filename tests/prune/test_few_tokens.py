"""The warning for full-XᵀX solves with fewer calibration tokens than a layer's inputs (hand-built stats)."""
import logging

import torch

from xpert_dist.prune.pruner import warn_few_tokens
from xpert_dist.stats.capture import InputStats


def _full(width: int, n: int) -> InputStats:
    return InputStats(torch.eye(width), n=n, mode="full")


def test_warns_when_tokens_below_widest_input(caplog):
    with caplog.at_level(logging.WARNING, logger="xpert_dist.prune.pruner"):
        widest = warn_few_tokens({"attn": _full(8, 12), "mlp_down": _full(16, 12)})
    assert widest == 16
    assert "12 calibration tokens" in caplog.text and ">= 16" in caplog.text


def test_silent_with_enough_tokens_or_diagonal_stats(caplog):
    with caplog.at_level(logging.WARNING, logger="xpert_dist.prune.pruner"):
        assert warn_few_tokens({"attn": _full(8, 16), "mlp_down": _full(16, 16)}) is None
        assert warn_few_tokens({"attn": InputStats(torch.ones(64), n=4, mode="diag")}) is None
    assert caplog.text == ""
