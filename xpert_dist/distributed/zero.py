"""DeepSpeed ZeRO-3 mechanics used by the distributed context (imported lazily: DeepSpeed optional).

* ``is_zero3_param(p)``: the parameter is partitioned by ZeRO-3 (it has ``ds_id``).
* ``suspended_zero_hooks(module)``: run plain forwards of a (gathered) module without DeepSpeed's
  per-submodule fetch/release hooks. Those hooks all-gather on a submodule's first use and
  partition again after it, and, once a trace of the training forward exists, prefetch the
  parameters of the *next* modules of that trace. Calibration runs a different, rank-dependent
  number of block forwards (ranks hold different numbers of batches), so with the hooks active the
  ranks' collectives would not match (hang) and the coordinator would raise "tracing error". The
  context removes exactly the hooks defined in DeepSpeed's sources from every submodule and puts
  them back, in their original order, on exit; the block's weights are materialised explicitly
  with ``GatheredParameters`` meanwhile.
* ``set_partition(param, value)``: write the local ZeRO-3 partition (``ds_tensor``) of a full value.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterable

import torch
from torch import nn

_DS_MARK = os.sep + "deepspeed" + os.sep
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def is_zero3_param(p) -> bool:
    return hasattr(p, "ds_id")


def has_zero3_params(params: Iterable) -> bool:
    return any(is_zero3_param(p) for p in params)


def _is_deepspeed_hook(hook) -> bool:
    """Whether a module hook was defined by DeepSpeed (seen through functools.wraps / partial /
    torch._dynamo.disable wrappers: by ``__module__`` or by the source file of the innermost code)."""
    fn = hook
    for _ in range(8):
        mod = getattr(fn, "__module__", None) or ""
        code = getattr(fn, "__code__", None)
        if mod == "deepspeed" or mod.startswith("deepspeed."):
            return True
        if code is not None and _DS_MARK in code.co_filename:
            return True
        nxt = getattr(fn, "__wrapped__", None) or getattr(fn, "func", None) or getattr(fn, "__func__", None)
        if nxt is None or nxt is fn:
            return False
        fn = nxt
    return False


@contextlib.contextmanager
def suspended_zero_hooks(module: nn.Module):
    """Temporarily remove DeepSpeed's forward hooks from ``module`` and all its submodules."""
    removed: list[tuple[dict, list, dict]] = []
    for m in module.modules():
        for attr in _HOOK_DICTS:
            d = getattr(m, attr, None)
            if not d:
                continue
            order = list(d.keys())
            ds = {k: h for k, h in d.items() if _is_deepspeed_hook(h)}
            if ds:
                for k in ds:
                    del d[k]
                removed.append((d, order, ds))
    try:
        yield
    finally:
        for d, order, ds in reversed(removed):
            current = dict(d)
            d.clear()
            for k in order:  # original order, then hooks added meanwhile
                if k in ds:
                    d[k] = ds[k]
                elif k in current:
                    d[k] = current.pop(k)
            d.update(current)


def gathered_state(p) -> str:
    """``"AVAILABLE"``, ``"NOT_AVAILABLE"`` or ``"INFLIGHT"`` for a ZeRO-3 parameter."""
    st = getattr(p, "ds_status", None)
    return getattr(st, "name", str(st))


def partition_range(param) -> tuple[int, int]:
    """(offset, count) of this rank's slice of the flattened full parameter (count may be < partition size)."""
    import torch.distributed as dist

    part = param.ds_tensor
    psize = part.ds_numel if hasattr(part, "ds_numel") else part.numel()
    group = getattr(param, "ds_process_group", None)
    rank = dist.get_rank(group=group) if group is not None else dist.get_rank()
    offset = psize * rank
    return offset, max(0, min(psize, param.ds_numel - offset))


@torch.no_grad()
def set_partition(param, value: torch.Tensor) -> None:
    """Copy this rank's slice of ``value`` (full shape) into the ZeRO-3 partition ``param.ds_tensor``."""
    flat = value.reshape(-1)
    offset, count = partition_range(param)
    part = param.ds_tensor.data.reshape(-1)
    if count:
        part[:count].copy_(flat[offset:offset + count].to(part.dtype))
    if count < part.numel():
        part[count:].zero_()


@contextlib.contextmanager
def partitioned_loading(ds_config: dict | None):
    """Build models partitioned (DeepSpeed ``zero.Init``) inside this block, and only here.

    transformers enters ``zero.Init`` in every ``from_pretrained``/``from_config`` while an
    ``HfDeepSpeedConfig`` object is alive; ``zero.Init`` broadcasts each new parameter from rank 0,
    a collective. Alive beyond the load, it turns any later model construction on one rank (export,
    evaluation, reports) into a collective that the other ranks never join: a hang, then a timeout.
    So the object lives exactly as long as this block, and the global reference is cleared on exit.
    Without ZeRO-3 (no config, or stage < 3) this does nothing.
    """
    stage = int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))
    if stage != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    hf_ds = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del hf_ds
        unset_hf_deepspeed_config()
        if is_deepspeed_zero3_enabled():  # a reference kept elsewhere would re-open the hang
            raise RuntimeError("partitioned_loading: zero.Init is still enabled after the model was loaded")


def zero3_init_enabled() -> bool:
    """Whether transformers would build new models under ``zero.Init`` right now."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the integration
        return False
    return bool(is_deepspeed_zero3_enabled())
