"""Sequential, block-by-block calibration (the SparseGPT/Wanda scheme).

Capture the inputs of block 0 once, then for each block: run the calibration batches through that
block alone with statistics hooks, let the caller prune it, and recompute its outputs as the next
block's inputs. Only one block's statistics exist at a time; activations between blocks stay on
the host. Under ZeRO-3 the caller supplies ``gather_block`` to materialise one block's weights.

Distributed calibration: each rank passes only its own batches (a contiguous run of the global
batches, e.g. ``ctx.shard(K)``) and their global indices (``batch_indices``), or a context ``ctx``
(a :class:`xpert_dist.distributed.context.DistContext`) from which the indices, the block gather and the
forward scope are derived. Every batch is a leaf of the canonical summation tree, so the
statistics handed to ``on_block`` reduce (``ctx.reduce_stats``) to the same bits for any world
size. A distributed context that is *active* (``TorchDistContext`` activates itself) is used
when no ``ctx`` is given, so callers written for one process work unchanged on many ranks.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.lora import bypass_zero_deltas
from ..models.structure import LLAMA_LINEARS, blocks, block_linears, unwrap
from ..errors import StatisticsError
from .capture import InputStats, StatsCollector

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


_ACTIVE: list = []  # the active distributed context (at most one), see ``activate``


def activate(ctx) -> None:
    """Make ``ctx`` the context ``sequential_calibration`` uses when the caller passes none."""
    _ACTIVE[:] = [ctx]


def deactivate(ctx=None) -> None:
    if ctx is None or (_ACTIVE and _ACTIVE[0] is ctx):
        _ACTIVE.clear()


def active_context():
    return _ACTIVE[0] if _ACTIVE else None


def pre_block_modules(model: nn.Module) -> list[nn.Module]:
    """The modules with parameters that run before block 0 (the token embedding)."""
    inner = unwrap(model).model
    return [m for name, m in inner.named_children() if name != "layers" and any(True for _ in m.parameters())
            and name not in ("norm",)]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int,
                         gather: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
                         ) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering block 0 for each calibration batch, plus the keyword arguments
    (rotary embeddings, causal mask) that the decoder layers receive. Stops the forward there.
    ``gather`` materialises the pre-block modules (ZeRO-3). It is entered even by a rank that holds
    no calibration rows: a ZeRO-3 gather is a collective, and every rank must join it."""
    layers = blocks(model)
    gather = gather or (lambda _m: contextlib.nullcontext())
    first = layers[0]
    captured: list[torch.Tensor] = []
    kwargs_seen: dict = {}

    def pre_hook(_m, args, kwargs):
        captured.append(args[0].detach().cpu() if args else kwargs["hidden_states"].detach().cpu())
        kwargs_seen.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = first.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        with contextlib.ExitStack() as stack:
            for m in pre_block_modules(model):
                stack.enter_context(gather(m))
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


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, device,
               compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One block's forward; under ``compute_dtype`` autocast when given (matmuls in that dtype, the
    residual stream and the statistics keep theirs)."""
    scope = (torch.autocast(device_type=torch.device(device).type, dtype=compute_dtype) if compute_dtype is not None
             else contextlib.nullcontext())
    with scope:
        out = block(hidden.to(device), **kwargs)
    return out[0] if isinstance(out, tuple) else out


@contextlib.contextmanager
def _shortcut_scope(block: nn.Module, on: bool, stop: nn.Module | None):
    """Forwards of ``block`` that give the same values faster (``shortcuts``): LoRA layers whose delta is
    exactly zero run their base layer alone (:func:`xpert_dist.models.lora.bypass_zero_deltas`), and with
    ``stop`` the forward ends (``_StopForward``) as that module is entered, after the statistics hooks
    registered before this scope have read its input."""
    if not on:
        yield
        return

    def halt(_m, _args):
        raise _StopForward

    handle = stop.register_forward_pre_hook(halt) if stop is not None else None
    try:
        with bypass_zero_deltas(block_linears(block).values()):
            yield
    finally:
        if handle is not None:
            handle.remove()


BlockCallback = Callable[..., None]  # on_block(i, block, stats) or, staged, on_block(i, block, stats, names=...)

# the staged forward (``staged=True``, ``prune.propagate=true_sequential``): a Llama block's input groups in the
# order the forward reads them, each with the modules that read it
STAGES = (("attn_in", ("q_proj", "k_proj", "v_proj")), ("o_in", ("o_proj",)),
          ("mlp_in", ("gate_proj", "up_proj")), ("down_in", ("down_proj",)))


@contextlib.contextmanager
def _patched_forward(module: nn.Module, fn):
    """``module`` runs ``fn`` instead of its forward inside (the hooks around it still run)."""
    module.forward = fn
    try:
        yield
    finally:
        module.__dict__.pop("forward", None)


@contextlib.contextmanager
def _halt_at(module: nn.Module, keep: list | None = None):
    """A forward stops (``_StopForward``) as ``module`` is entered, after the pre-hooks registered before this
    one (the statistics) have read its input; ``keep`` collects that input."""
    def halt(_m, args):
        if keep is not None:
            keep.append(args[0].detach().cpu())
        raise _StopForward

    handle = module.register_forward_pre_hook(halt)
    try:
        yield
    finally:
        handle.remove()


def _staged_block(i: int, block: nn.Module, hidden: list, kwargs: dict, device, compute_dtype, batch_indices,
                  collect: Callable[[dict], StatsCollector], on_block: BlockCallback, shortcuts: bool,
                  need_outputs: bool) -> list | None:
    """One block calibrated group by group (SparseGPT's "true sequential" order): the statistics of each
    input group (:data:`STAGES`) come from a forward in which the groups before it are already pruned
    (``on_block(i, block, stats, names=...)`` is called per group), and every linear runs once, pruned: a
    forward stops at the next group's first module and keeps what that group needs (the attention output
    before ``o_proj``, ``down_proj``'s input, ``o_proj``'s output), and the later stages start from those
    through the block's own code (``self_attn``/``mlp`` replaced by ``o_proj``/``down_proj`` of the kept
    tensors), so the residual adds and norms are the block's. Returns the pruned block's outputs (the same
    values as its whole forward) when ``need_outputs``."""
    lin = block_linears(block)
    attn, mlp = block.self_attn, block.mlp
    attn_out: list = []  # o_proj's input per batch
    o_out: list = []  # o_proj's output per batch (pruned)
    down_in: list = []  # down_proj's input per batch (gate/up pruned)
    cur = [0]  # the batch being run, for the patched forwards

    def from_o_proj(*_a, **_k):
        out = lin["o_proj"](attn_out[cur[0]].to(device))
        o_out.append(out.detach().cpu())
        return out, None

    def kept_o(*_a, **_k):
        return o_out[cur[0]].to(device), None

    def from_down_proj(*_a, **_k):
        return lin["down_proj"](down_in[cur[0]].to(device))

    # stage: (its group's modules, the module where its forward stops, its input kept there, patched forwards)
    plan = [(STAGES[0][1], lin["q_proj"], None, ()),
            (STAGES[1][1], lin["o_proj"], attn_out, ()),
            (STAGES[2][1], lin["gate_proj"], None, ((attn, from_o_proj),)),
            (STAGES[3][1], lin["down_proj"], down_in, ((attn, kept_o),))]
    for names, stop, keep, patches in plan:
        with contextlib.ExitStack() as stack:
            col = stack.enter_context(collect({n: lin[n] for n in names}))
            stack.enter_context(_halt_at(stop, keep))
            stack.enter_context(_shortcut_scope(block, shortcuts, None))  # the groups pruned so far may be bypassed
            for module, fn in patches:
                stack.enter_context(_patched_forward(module, fn))
            for b, (g, h) in enumerate(zip(batch_indices, hidden)):
                cur[0] = b
                col.set_batch(g)
                try:
                    _run_block(block, h, kwargs, device, compute_dtype)
                except _StopForward:
                    pass
        on_block(i, block, col.stats(allow_empty=True) if not hidden else col.stats(), names=names)
        if patches and patches[0][1] is from_o_proj:
            attn_out.clear()  # every later stage starts from o_proj's kept output
    outs = None
    if need_outputs:
        outs = []
        with _shortcut_scope(block, shortcuts, None), _patched_forward(attn, kept_o), \
                _patched_forward(mlp, from_down_proj):
            for b, h in enumerate(hidden):
                cur[0] = b
                outs.append(_run_block(block, h, kwargs, device, compute_dtype).cpu())
    o_out.clear()
    down_in.clear()
    return outs


def _resolve(ctx, n_local: int, batch_indices, gather_block, forward_context, model):
    """Fill the distributed defaults from ``ctx`` (explicit arguments win)."""
    if ctx is None:
        ctx = active_context()
    gather_pre = gather_block
    if ctx is not None:
        if gather_pre is None and hasattr(ctx, "gather"):
            gather_pre = lambda m: ctx.gather(m, modify=False)  # noqa: E731
        if gather_block is None and hasattr(ctx, "gather"):
            gather_block = lambda b: ctx.gather(b, modify=True)  # noqa: E731 (writes in on_block persist)
        if forward_context is None and hasattr(ctx, "calibration_scope"):
            forward_context = ctx.calibration_scope(model)
        if batch_indices is None and hasattr(ctx, "global_batch_indices") and getattr(ctx, "world_size", 1) > 1:
            batch_indices = ctx.global_batch_indices(n_local)
    if batch_indices is None:
        batch_indices = range(n_local)
    batch_indices = [int(b) for b in batch_indices]
    if len(batch_indices) != n_local:
        raise StatisticsError(f"batch_indices has {len(batch_indices)} entries for {n_local} local batches")
    if any(b != batch_indices[0] + j for j, b in enumerate(batch_indices)):
        raise StatisticsError(f"batch_indices must be one contiguous increasing run, got {batch_indices[:8]}...")
    null = lambda _b: contextlib.nullcontext()  # noqa: E731
    return batch_indices, gather_block or null, gather_pre or null, forward_context or contextlib.nullcontext()


@torch.no_grad()
def sequential_calibration(model: nn.Module, input_ids: torch.Tensor, on_block: BlockCallback, *,
                           mode: str = "diag", modules=None, dtype=torch.float32, batch_size: int = 8,
                           gather_block: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None,
                           recompute: bool = True, progress: bool = True, desc: str = "calibrate",
                           batch_indices: Sequence[int] | None = None, ctx=None,
                           forward_context: contextlib.AbstractContextManager | None = None,
                           reduction: str = "tree", partials_device=None,
                           compute_dtype: torch.dtype | None = None, shortcuts: bool = True,
                           staged: bool = False) -> None:
    """Call ``on_block(i, block, stats)`` for every decoder block, in order, with that block's
    statistics computed on inputs that already went through the (pruned) earlier blocks.

    ``stats`` maps input-group names (``attn_in``, ``o_in``, ``mlp_in``, ``down_in``) to InputStats.
    ``recompute=False`` reuses the block outputs from before ``on_block`` (faster, less exact).

    ``input_ids`` are this process's calibration rows, cut into batches of ``batch_size``;
    ``batch_indices[j]`` is the global index of local batch ``j`` (default ``0, 1, ...``, or from
    ``ctx``). Under several ranks the statistics passed to ``on_block`` are this rank's partials
    (possibly empty); ``ctx.reduce_stats`` turns them into the global ones. ``partials_device``
    (default: ``ctx.partials_device`` if set) keeps the tree partials there (``"cpu"``: host memory).
    ``compute_dtype`` (e.g. ``torch.bfloat16``) runs the block forwards under autocast, as a half-precision
    model would run them; the statistics still accumulate in ``dtype`` (``prune.calib_dtype``).
    ``shortcuts`` (default): the same statistics and outputs bit for bit, with less work
    (:func:`_shortcut_scope`, and no recompute of the last block, whose outputs feed no block); off, every
    forward runs whole (the reference the tests compare with).
    ``staged`` (``prune.propagate=true_sequential``; needs ``recompute`` and all seven linears): each block is
    calibrated input group by input group, every group on the outputs of the block's groups pruned before it,
    and ``on_block(i, block, stats, names=...)`` is called once per group (:func:`_staged_block`): one
    forward of each linear per block instead of a statistics forward and a recompute.
    """
    if staged and not recompute:
        raise StatisticsError("staged calibration hands on the pruned outputs: it needs recompute=True")
    if staged and modules and set(modules) != set(LLAMA_LINEARS):
        raise StatisticsError(f"staged calibration prunes every linear of a block, group by group; got modules "
                              f"{list(modules)}, need all of {list(LLAMA_LINEARS)}")
    n_local = -(-input_ids.shape[0] // batch_size) if input_ids.shape[0] else 0
    batch_indices, gather_block, gather_pre, forward_context = _resolve(ctx, n_local, batch_indices, gather_block,
                                                            forward_context, model)
    if partials_device is None:
        partials_device = getattr(ctx if ctx is not None else active_context(), "partials_device", None)
    was_training = model.training
    model.eval()
    layers = blocks(model)
    try:
        with forward_context:
            hidden, kwargs = capture_block_inputs(model, input_ids, batch_size, gather=gather_pre)
            device = next(iter(layers[0].parameters())).device
            kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else
                          tuple(t.to(device) for t in v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}
            names = modules or None
            collect = lambda lin: StatsCollector(lin, mode=mode, dtype=dtype, reduction=reduction,  # noqa: E731
                                                 partials_device=partials_device)
            for i, block in enumerate(tqdm(layers, desc=desc, disable=not progress, leave=False)):
                if staged:
                    with gather_block(block):
                        hidden = _staged_block(i, block, hidden, kwargs, device, compute_dtype, batch_indices,
                                               collect, on_block, shortcuts,
                                               need_outputs=not (shortcuts and i + 1 == len(layers)))
                    continue
                linears = block_linears(block, names) if names else block_linears(block)
                # with ``recompute`` the statistics forward's outputs are thrown away, so it stops once the
                # last module's input is recorded (down_proj's: its matmul and adapter are skipped)
                stop = linears.get("down_proj") if recompute and shortcuts else None
                with gather_block(block):
                    with StatsCollector(linears, mode=mode, dtype=dtype, reduction=reduction,
                                        partials_device=partials_device) as col, \
                            _shortcut_scope(block, shortcuts, stop):
                        outs = []
                        for g, h in zip(batch_indices, hidden):
                            col.set_batch(g)
                            try:
                                outs.append(_run_block(block, h, kwargs, device, compute_dtype).cpu())
                            except _StopForward:
                                pass
                    on_block(i, block, col.stats(allow_empty=True) if not hidden else col.stats())
                    if recompute and not (shortcuts and i + 1 == len(layers)):  # the last block's outputs feed none
                        outs = None  # free the stale outputs first: 2, not 3, copies of the activations
                        with _shortcut_scope(block, shortcuts, None):  # on_block may have zeroed the adapters
                            outs = [_run_block(block, h, kwargs, device, compute_dtype).cpu() for h in hidden]
                hidden = outs
    finally:
        model.train(was_training)


def shard_rows(input_ids: torch.Tensor, batch_size: int, batches: Sequence[int] | range) -> torch.Tensor:
    """The rows of ``input_ids`` that make up the given global batches (e.g. ``ctx.shard(K)``)."""
    batches = list(batches)
    if not batches:
        return input_ids[:0]
    n = input_ids.shape[0]
    return input_ids[batches[0] * batch_size:min((batches[-1] + 1) * batch_size, n)]


@torch.no_grad()
def full_forward_stats(model: nn.Module, input_ids: torch.Tensor, *, mode: str = "diag", dtype=torch.float32,
                       batch_size: int = 8) -> dict[int, dict[str, InputStats]]:
    """Statistics of every block from ordinary full forwards (no pruning in between)."""
    linears = {f"{i}.{n}": m for i, b in enumerate(blocks(model)) for n, m in block_linears(b).items()}
    with StatsCollector(linears, mode=mode, dtype=dtype) as col:
        for b, start in enumerate(range(0, input_ids.shape[0], batch_size)):
            col.set_batch(b)
            unwrap(model)(input_ids=input_ids[start:start + batch_size], use_cache=False)
    out: dict[int, dict[str, InputStats]] = {}
    for key, st in col.stats().items():
        i, g = key.split(".", 1)
        out.setdefault(int(i), {})[g] = st
    return out


def iter_batches(ids: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for s in range(0, ids.shape[0], batch_size):
        yield ids[s:s + batch_size]
