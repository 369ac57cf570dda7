"""The multi-rank DistContext: torch.distributed collectives, owner ranks, ZeRO-3 gathers and writes.

See ``context.py`` for the interface and the determinism contract.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
from typing import Any, Callable

import torch
from torch import nn

from ..errors import DistributedError, StatisticsError
from ..stats import sequential as _sequential
from ..stats.capture import InputStats, group_key
from .comm import PhaseBoard, guard, init_distributed, message_dtype, set_phase_board, timeout_seconds
from .context import DistContext
from .owners import assign_owners
from . import stats_reduce
from .zero import gathered_state, is_zero3_param, set_partition, suspended_zero_hooks

log = logging.getLogger(__name__)

# statistics of at least this many bytes, on at least this many ranks, are reduced by reduce-scatter +
# gather (scatter_reduce.py): 2·(p-1)/p·S at the owner instead of (p-1)·S. Smaller ones travel whole to
# the owner (fewer messages); on 2 ranks both bring S to the owner and the two phases are slower
# (bench/results/stats_reduction.md, one loaded 2-core host over loopback: median 0.69-0.83x at 2 ranks,
# 1.05-1.32x at 4 and 8 ranks; there all ranks share the same cores, on a cluster the owner's link is the limit)
SCATTER_MIN_BYTES = 16 * 1024 ** 2
SCATTER_MIN_WORLD = 3


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 view of a contiguous tensor (so any dtype, bool and bf16 included, travels over gloo)."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else t.reshape(-1).to(torch.uint8)


class _Gather:
    """ZeRO-3 gather of some parameters (nesting-aware), optionally without DeepSpeed's hooks."""

    def __init__(self, ctx: "TorchDistContext", params: list, modify: bool, module: nn.Module | None):
        self.ctx, self.params, self.modify, self.module = ctx, params, modify, module
        self.fresh: list = []
        self.gp = None
        self.stack = contextlib.ExitStack()

    def __enter__(self):
        ctx = self.ctx
        for p in self.params:
            outer = ctx._gathered.get(id(p))
            if outer is None:
                self.fresh.append(p)
            elif self.modify and not outer:
                raise DistributedError(
                    f"gather(modify=True) of parameter ds_id={p.ds_id} {tuple(p.ds_shape)} inside a read-only "
                    "gather of the same parameter: its writes would be discarded; gather with modify=True "
                    "outside")
        if self.module is not None:
            self.stack.enter_context(suspended_zero_hooks(self.module))
        if self.fresh:
            import deepspeed

            n = sum(int(p.ds_numel) for p in self.fresh)
            self.op = f"gather({len(self.fresh)} parameters, {n} elements, modify={self.modify})"
            self.gp = deepspeed.zero.GatheredParameters(self.fresh, modifier_rank=0 if self.modify else None)
            try:
                with guard(self.op, ctx.rank, timeout_s=ctx.timeout_s):
                    self.gp.__enter__()
            except BaseException:
                self.stack.close()
                raise
            for p in self.fresh:
                ctx._gathered[id(p)] = self.modify
        return self

    def __exit__(self, exc_type, exc, tb):
        ctx = self.ctx
        try:
            if self.gp is not None:
                for p in self.fresh:
                    ctx._gathered.pop(id(p), None)
                together = exc is None or getattr(exc, "xpert_all_ranks", False)
                if isinstance(exc, DistributedError) and not together:
                    # a peer is gone: the re-partition collective would only wait for it; keep the first error
                    return False
                try:
                    with guard(f"release of {self.op}", ctx.rank, timeout_s=ctx.timeout_s):
                        self.gp.__exit__(exc_type, exc, tb)
                except DistributedError:
                    if exc is None:
                        raise
                    log.error("rank %d: releasing %s failed while handling %r", ctx.rank, self.op, exc)
        finally:
            self.stack.close()
        return False


class TorchDistContext(DistContext):
    """Several ranks over torch.distributed (gloo or nccl), with or without ZeRO-3 partitioning.

    * ``shard(K)``: contiguous, balanced runs of the K calibration batches, in rank order.
    * ``gather(params_or_module, modify)``: ZeRO-3 parameters are materialised with
      ``deepspeed.zero.GatheredParameters(..., modifier_rank=0 if modify else None)``; given a
      module, DeepSpeed's fetch hooks are also suspended on it so plain forwards run inside.
      Nested gathers of the same parameters are no-ops (a modifying gather inside a read-only one
      is refused: its writes would be lost).
    * ``reduce_stats``: canonical-tree reduction to each statistic's owner (``assign_owners`` by
      bytes, shifted by ``rotation`` ranks: a prune step passes the block index); the owner holds
      the full statistic, every rank gets ``n`` and the diagonal (the
      whole statistic in ``diag`` mode, or with ``replicate=True``). A statistic of at least
      ``scatter_min_bytes`` on at least ``scatter_min_world`` ranks (defaults ``SCATTER_MIN_BYTES``,
      ``SCATTER_MIN_WORLD``) is reduced by reduce-scatter over row chunks, then gathered on the
      owner (``scatter_reduce.py``: the same bits, 2·(p-1)/p·S at the owner instead of (p-1)·S);
      the others are sent whole to the owner.
    * ``compute_owned(keys, sizes, fn)``: ``fn(key)`` runs on the key's owner (the owner of the
      statistic the module reads, when ``reduce_stats`` ran for it), results are broadcast to every
      rank in the given key order.
    * ``write_frozen``: inside ``gather(..., modify=True)``; every rank writes the same value into
      its gathered copy (rank 0's copy is what the gather's exit broadcasts and re-partitions), so
      forwards inside the gather see the new weight on every rank.
    * ``write_trainable``: ZeRO-3 partition (``ds_tensor``) of the parameter, its gathered copy if
      gathered, and the optimizer's fp32 master (``deepspeed.utils.safe_set_full_fp32_param``).

    Every collective runs in a dedicated process group with a bounded timeout (``timeout_s``,
    $XPERT_DIST_TIMEOUT_S, default 60 s) and failures raise DistributedError naming the operation
    and the rank.
    """

    def __init__(self, zero3: bool | None = None, timeout_s: float | None = None, *, group=None,
                 device: torch.device | str | None = None, activate: bool = True,
                 partials_device: torch.device | str | None = None, scatter_min_bytes: int | None = None):
        import torch.distributed as dist

        self.timeout_s = timeout_seconds(timeout_s)
        if not dist.is_initialized():
            init_distributed(timeout_s=self.timeout_s)
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.backend = str(dist.get_backend())
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                      else torch.device("cpu"))
        self.device = torch.device(device)
        if group is None:
            with guard("new_group", self.rank, timeout_s=self.timeout_s):
                group = dist.new_group(backend=self.backend, timeout=datetime.timedelta(seconds=self.timeout_s))
        self.group = group
        self.zero3 = bool(zero3) if zero3 is not None else False
        self._gathered: dict[int, bool] = {}
        self._stat_owners: dict[str, int] = {}
        self._round = 0  # reduce_stats calls so far (same on every rank)
        self.partials_device = partials_device
        self.scatter_min_bytes = SCATTER_MIN_BYTES if scatter_min_bytes is None else int(scatter_min_bytes)
        self.scatter_min_world = SCATTER_MIN_WORLD
        self.board = PhaseBoard(self.rank, self.world_size)
        set_phase_board(self.board)
        if activate:
            _sequential.activate(self)

    # ------------------------------------------------------------------ plain collectives (guarded)
    def all_gather_object(self, obj, op: str = "all_gather_object") -> list:
        out: list = [None] * self.world_size
        with guard(op, self.rank, timeout_s=self.timeout_s):
            self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_object(self, obj, src: int = 0, op: str = "broadcast_object"):
        box = [obj if self.rank == src else None]
        with guard(op, self.rank, peer=src if src != self.rank else None, timeout_s=self.timeout_s):
            self._dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def phase(self, name: str) -> None:
        """Post the phase this rank enters (named in any later collective failure, on every rank)."""
        self.board.post(name)

    def one_rank(self, phase: str, src: int = 0) -> contextlib.AbstractContextManager:
        """On rank ``src``: run the block with a heartbeat. Elsewhere: a no-op; call
        ``wait_for(phase, src)`` afterwards (one-rank work may take longer than the collective
        timeout, e.g. evaluation, so the others wait on the heartbeat, not in a barrier)."""
        # the heartbeat beats well within the timeout the waiting ranks apply to it
        return (self.board.working(phase, every_s=min(5.0, self.timeout_s / 4)) if self.rank == src
                else contextlib.nullcontext())

    def wait_for(self, phase: str, src: int = 0) -> None:
        """Every rank but ``src``: wait until ``src`` finished ``one_rank(phase)``."""
        if self.rank != src:
            self.board.wait_done(phase, src, self.timeout_s)

    def barrier(self, after: str | None = None) -> None:
        """Wait for every rank; ``after`` names what this rank just finished (for the error message)."""
        if after:
            self.board.post(f"waiting after {after}")
        with guard(f"barrier after {after}" if after else "barrier", self.rank, timeout_s=self.timeout_s):
            self._dist.barrier(group=self.group)

    def _broadcast(self, t: torch.Tensor, src: int, op: str) -> None:
        with guard(op, self.rank, peer=src if src != self.rank else None, timeout_s=self.timeout_s):
            self._dist.broadcast(_as_bytes(t), src=src, group=self.group)

    def _send(self, t: torch.Tensor, dst: int, op: str) -> None:
        with guard(op, self.rank, peer=dst, timeout_s=self.timeout_s):
            self._dist.send(_as_bytes(t.contiguous()), dst=dst, group=self.group)

    def _recv(self, t: torch.Tensor, src: int, op: str) -> None:
        with guard(op, self.rank, peer=src, timeout_s=self.timeout_s):
            self._dist.recv(_as_bytes(t), src=src, group=self.group)

    def close(self) -> None:
        _sequential.deactivate(self)

    # ------------------------------------------------------------------ work split
    def global_batch_indices(self, n_local: int) -> range:
        counts = self.all_gather_object(int(n_local), op="global_batch_indices")
        start = sum(counts[:self.rank])
        return range(start, start + int(n_local))

    def owner_of(self, key: str) -> int:
        if key in self._stat_owners:
            return self._stat_owners[key]
        try:
            g = group_key(key)
        except StatisticsError:
            g = None
        if g in self._stat_owners:
            return self._stat_owners[g]
        raise DistributedError(f"no owner known for {key!r}: reduce its statistics first or use compute_owned")

    # ------------------------------------------------------------------ weights
    def calibration_scope(self, model: nn.Module) -> contextlib.AbstractContextManager:
        if any(is_zero3_param(p) for p in model.parameters()):
            return suspended_zero_hooks(model)
        return contextlib.nullcontext()

    def gather(self, params, modify: bool = False) -> contextlib.AbstractContextManager:
        module = params if isinstance(params, nn.Module) else None
        plist = list(module.parameters()) if module is not None else list(params)
        zparams = [p for p in plist if is_zero3_param(p)]
        if not zparams:
            return contextlib.nullcontext()
        return _Gather(self, zparams, modify, module)

    @torch.no_grad()
    def write_frozen(self, param: nn.Parameter, value: torch.Tensor) -> None:
        if is_zero3_param(param):
            if self._gathered.get(id(param)) is not True:
                raise DistributedError(
                    f"write_frozen on ZeRO-3 parameter ds_id={param.ds_id} {tuple(param.ds_shape)} outside "
                    "ctx.gather(..., modify=True): the write would be discarded")
            param.data.copy_(value.reshape(param.ds_shape).to(device=param.data.device, dtype=param.dtype))
            return
        param.data.copy_(value.reshape(param.shape).to(device=param.data.device, dtype=param.dtype))

    @torch.no_grad()
    def write_trainable(self, param: nn.Parameter, value: torch.Tensor) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        if is_zero3_param(param):
            full = value.reshape(param.ds_shape)
            if gathered_state(param) == "AVAILABLE" and param.data.numel() == param.ds_numel:
                param.data.copy_(full.to(device=param.data.device, dtype=param.dtype))
            set_partition(param, full)
            if getattr(param, "_z3_optimizer", None) is not None and param.requires_grad:
                safe_set_full_fp32_param(param, full.to(torch.float32))
            return
        param.data.copy_(value.reshape(param.shape).to(device=param.data.device, dtype=param.dtype))
        if hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and the bf16 optimizer keep an fp32 master
            safe_set_full_fp32_param(param, value.reshape(param.shape).to(torch.float32))

    # ------------------------------------------------------------------ statistics
    def reduce_stats(self, stats: dict[str, InputStats], replicate: bool = False,
                     rotation: int | None = None) -> dict[str, InputStats]:
        """Canonical-tree reduction of every statistic to its owner rank (see the module docstring).

        ``rotation``: the owners of ``assign_owners`` shift by this many ranks (a prune step passes the
        block index: the same block layout comes back every block, and without a shift one rank would
        own every block's largest statistic). It must name the statistic, not the call: what an owner
        keeps between prune steps (EMA scores, carried XᵀX) is read by the next step's owner of the same
        block, so that owner must not move. None: the count of reductions so far (one-off reductions).

        The input partials are consumed. Returns, on every rank, one InputStats per key: the full
        statistic on its owner (and everywhere with ``replicate=True`` or in ``diag`` mode), else a
        remote statistic with ``n``, the diagonal and ``owner``.
        """
        shift = self._round if rotation is None else int(rotation)
        out, owners = stats_reduce.reduce_stats(self, stats, replicate, shift)
        self._round += 1
        self._stat_owners = dict(owners)
        return out

    # ------------------------------------------------------------------ owned computations
    def _owners_for(self, keys: list[str], sizes: dict[str, int]) -> dict[str, int]:
        out = {}
        for k in keys:
            try:
                out[k] = self.owner_of(k)
            except DistributedError:
                pass
        rest = [k for k in keys if k not in out]
        if rest:
            out.update(assign_owners({k: int(sizes.get(k, 0)) for k in rest}, self.world_size))
        return out

    def compute_owned(self, keys: list[str], sizes: dict[str, int],
                      fn: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        keys = list(keys)
        owners = self._owners_for(keys, sizes)
        local: dict[str, dict[str, Any]] = {}
        failure, failure_exc = None, None
        for k in keys:
            if owners[k] != self.rank:
                continue
            try:
                res = fn(k)
                if not isinstance(res, dict):
                    raise DistributedError(f"compute_owned: fn({k!r}) returned {type(res).__name__}, expected a dict")
                local[k] = res
            except Exception as e:  # reported to every rank below, re-raised here
                failure, failure_exc = (k, f"{type(e).__name__}: {e}"), e
                break
        meta = {}
        for k, res in local.items():
            meta[k] = [(name, ("tensor", tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else ("obj", v))
                       for name, v in sorted(res.items())]
        metas = self.all_gather_object({"keys": keys, "meta": meta, "failure": failure},
                                       op="compute_owned (metadata)")
        for r, m in enumerate(metas):
            if m["keys"] != keys:
                raise DistributedError(f"compute_owned: rank {r} computes keys {m['keys']} but rank {self.rank} "
                                       f"has {keys}; every rank must pass the same keys in the same order")
        for r, m in enumerate(metas):
            if m["failure"] is not None:
                # every rank raises here, together: enclosing gathers may release collectively
                if r == self.rank:
                    failure_exc.xpert_all_ranks = True
                    raise failure_exc
                k, msg = m["failure"]
                err = DistributedError(f"compute_owned: fn({k!r}) failed on its owner rank {r}: {msg}")
                err.xpert_all_ranks = True
                raise err
        out: dict[str, dict[str, Any]] = {}
        for k in keys:
            o = owners[k]
            res = {}
            for name, desc in metas[o]["meta"][k]:
                if desc[0] == "obj":
                    res[name] = desc[1]
                    continue
                _, shape, dt = desc
                if self.rank == o:
                    src = local[k][name]
                    t = src.detach().to(self.device).contiguous()
                else:
                    t = torch.empty(shape, dtype=message_dtype(dt), device=self.device)
                self._broadcast(t, o, f"compute_owned: broadcast {k!r}/{name} from rank {o}")
                res[name] = local[k][name] if self.rank == o else t
            out[k] = res
        return out
