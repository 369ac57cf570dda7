"""Sequential, block-by-block calibration (the SparseGPT/Wanda scheme).

Capture the inputs of block 0 once, then for each block: run the calibration batches through that
block alone with statistics hooks, let the caller prune it, and recompute its outputs as the next
block's inputs. Only one block's statistics exist at a time; activations between blocks stay on
the host. Under ZeRO-3 the caller supplies ``gather_block`` to materialise one block's weights.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.structure import blocks, block_linears, unwrap
from .capture import InputStats, StatsCollector

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering block 0 for each calibration batch, plus the keyword arguments
    (rotary embeddings, causal mask) that the decoder layers receive. Stops the forward there."""
    layers = blocks(model)
    first = layers[0]
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def pre_hook(_m, args, kwargs):
        captured.append(args[0].detach().cpu() if args else kwargs["hidden_states"].detach().cpu())
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                unwrap(model)(input_ids=input_ids[start:start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs_seen["use_cache"] = False
    kwargs_seen.pop("cache", None)
    kwargs_seen.pop("past_key_values", None)
    return captured, kwargs_seen


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device) -> torch.Tensor:
    out = block(hidden.to(device), **kwargs)
    return out[0] if isinstance(out, tuple) else out


BlockCallback = Callable[[int, nn.Module, dict[str, InputStats]], None]


@torch.no_grad()
def sequential_calibration(model: nn.Module, input_ids: torch.Tensor, on_block: BlockCallback, *,
                           mode: str = "diag", modules=None, dtype=torch.float32, batch_size: int = 8,
                           gather_block: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
                           recompute: bool = True, progress: bool = True, desc: str = "calibrate") -> None:
    """Call ``on_block(i, block, stats)`` for every decoder block, in order, with that block's
    statistics computed on inputs that already went through the (pruned) earlier blocks.

    ``stats`` maps input-group names (``attn_in``, ``o_in``, ``mlp_in``, ``down_in``) to InputStats.
    ``recompute=False`` reuses the block outputs from before ``on_block`` (faster, less exact).
    """
    gather_block = gather_block or (lambda _b: contextlib.nullcontext())
    was_training = model.training
    model.eval()
    hidden, kwargs = capture_block_inputs(model, input_ids, batch_size)
    layers = blocks(model)
    device = next(iter(layers[0].parameters())).device
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else
                  tuple(t.to(device) for t in v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
    names = modules or None
    for i, block in enumerate(tqdm(layers, desc=desc, disable=not progress, leave=False)):
        linears = block_linears(block, names) if names else block_linears(block)
        with gather_block(block):
            with StatsCollector(linears, mode=mode, dtype=dtype) as col:
                outs = [_run_block(block, h, kwargs, device).cpu() for h in hidden]
            on_block(i, block, col.stats())
            if recompute:
                outs = [_run_block(block, h, kwargs, device).cpu() for h in hidden]
        hidden = outs
    model.train(was_training)


@torch.no_grad()
def full_forward_stats(model: nn.Module, input_ids: torch.Tensor, *, mode: str = "diag", dtype=torch.float32,
                       batch_size: int = 8) -> dict[int, dict[str, InputStats]]:
    """Statistics of every block from ordinary full forwards (no pruning in between)."""
    linears = {f"{i}.{n}": m for i, b in enumerate(blocks(model)) for n, m in block_linears(b).items()}
    with StatsCollector(linears, mode=mode, dtype=dtype) as col:
        for start in range(0, input_ids.shape[0], batch_size):
            unwrap(model)(input_ids=input_ids[start:start + batch_size], use_cache=False)
    out: dict[int, dict[str, InputStats]] = {}
    for key, st in col.stats().items():
        i, g = key.split(".", 1)
        out.setdefault(int(i), {})[g] = st
    return out


def iter_batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for s in range(0, ids.shape[0], batch_size):
        yield ids[s:s + batch_size]
