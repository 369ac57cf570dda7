"""Forward hooks that accumulate calibration statistics of linear inputs.

One statistic per *distinct* input tensor of a Llama block (q/k/v share ``attn_in``, gate/up share
``mlp_in``): the running sum of XᵀX (``full``) or only its diagonal (``diag``), plus the token
count. Sums, not means, so that statistics from several ranks or batches add up exactly.

Each calibration batch is one *leaf* with a global index (``collector.set_batch(g)``); leaves are
combined with the canonical pairwise tree of :mod:`xpert_dist.stats.tree`, so the same batches give
the same bits whether one process sees all of them or many ranks see contiguous shares.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import DistributedError, StatisticsError
from ..models.structure import INPUT_GROUPS
from .tree import Node, TreeSum, fold_nodes

MODES = ("diag", "full")


class InputStats:
    """Σ XᵀX (``full``: [in,in]) or Σ diag (``diag``: [in]) over ``n`` tokens.

    ``InputStats(sum, n, mode)`` is a finished statistic. A collector under canonical tree
    reduction also attaches ``nodes``: the maximal canonical subtrees (see :mod:`.tree`) of the
    global batch range ``span = (first, stop)`` this process saw; ``sum`` is then their canonical
    fold, computed on first use. The distributed reduction sends ``nodes`` (not ``sum``) to the
    statistic's owner, which is what makes the result independent of the world size.

    A *remote* statistic (``owner`` set, no ``sum``) is what a non-owner rank holds after a
    distributed reduction of a ``full`` statistic: ``n`` and the diagonal are here, the Hessian
    lives on rank ``owner`` (reading ``sum``/``hessian`` raises, naming that rank).
    """

    __slots__ = ("_sum", "n", "mode", "nodes", "span", "_diag", "owner")

    def __init__(self, sum: torch.Tensor | None = None, n: int = 0, mode: str = "diag", *,
                 nodes: list[Node] | None = None, span: tuple[int, int] | None = None,
                 diag: torch.Tensor | None = None, owner: int | None = None):
        if mode not in MODES:
            raise StatisticsError(f"unknown statistics mode {mode!r}; use one of {MODES}")
        self._sum = sum
        self.n = int(n)
        self.mode = mode
        self.nodes = nodes
        self.span = span
        self._diag = diag
        self.owner = owner

    # ------------------------------------------------------------------ values
    @property
    def sum(self) -> torch.Tensor:
        if self._sum is None:
            if self.nodes:
                self._sum = fold_nodes(self.nodes)
            elif self.owner is not None:
                raise DistributedError(f"the full {self.mode} statistic lives on rank {self.owner}; read it "
                                       f"there (inside DistContext.compute_owned), or reduce with replicate=True")
            else:
                raise StatisticsError("empty statistic: this process saw no calibration batch")
        return self._sum

    @sum.setter
    def sum(self, value: torch.Tensor) -> None:
        self._sum = value

    @property
    def resident(self) -> bool:
        """Whether the full statistic (not only its diagonal) is held by this process."""
        return self._sum is not None or bool(self.nodes)

    @property
    def empty(self) -> bool:
        return not self.resident and self._diag is None

    @property
    def diag(self) -> torch.Tensor:
        if self._diag is not None:
            return self._diag
        return self.sum if self.mode == "diag" else self.sum.diagonal()

    @property
    def hessian(self) -> torch.Tensor:
        if self.mode != "full":
            raise StatisticsError("the full XᵀX was not collected (stats mode 'diag'); "
                                  "this method needs stats mode 'full'")
        return self.sum

    @property
    def shape(self) -> tuple[int, ...]:
        if self._sum is not None:
            return tuple(self._sum.shape)
        if self.nodes:
            return tuple(self.nodes[0].value.shape)
        if self._diag is not None:
            k = self._diag.shape[0]
            return (k, k) if self.mode == "full" else (k,)
        raise StatisticsError("empty statistic has no shape")

    def drop_nodes(self) -> "InputStats":
        """Release the tree partials (after ``sum`` was computed or the reduction consumed them)."""
        if self.nodes and self._sum is None:
            self._sum = fold_nodes(self.nodes)
        self.nodes = None
        return self

    def __add__(self, other: "InputStats") -> "InputStats":
        if other.mode != self.mode or other.sum.shape != self.sum.shape:
            raise StatisticsError("cannot add statistics of different mode or shape")
        return InputStats(self.sum + other.sum, self.n + other.n, self.mode)

    def __eq__(self, other) -> bool:
        if not isinstance(other, InputStats):
            return NotImplemented
        return (self.mode == other.mode and self.n == other.n and self.resident and other.resident
                and self.sum.dtype == other.sum.dtype and torch.equal(self.sum, other.sum))

    __hash__ = None

    def __repr__(self) -> str:
        where = "resident" if self.resident else (f"on rank {self.owner}" if self.owner is not None else "empty")
        return f"InputStats(mode={self.mode!r}, n={self.n}, shape={self.shape if not self.empty else None}, {where})"

    def nbytes(self) -> int:
        if self._sum is not None:
            return self._sum.numel() * self._sum.element_size()
        if self.nodes:
            return sum(nd.value.numel() * nd.value.element_size() for nd in self.nodes)
        if self._diag is not None:
            return self._diag.numel() * self._diag.element_size()
        return 0


def gram_into(flat: torch.Tensor, into: torch.Tensor | None, block: int | None = None) -> torch.Tensor:
    """``into + flatᵀ·flat`` (``into=None``: ``flatᵀ·flat``) for ``flat[tokens, n]``, computing only the blocks on
    and above the diagonal (``⌈n/block⌉`` row panels, each ``panelᵀ·flat[:, start:]``) and mirroring the
    off-diagonal ones: ``(k+1)/2k`` of a full product's multiply-adds for ``k`` panels (5/8 at the default
    ``k=4``; a prune step's XᵀX accumulation on SmolLM2 took 0.70x of full products' time,
    ``bench/results/prune_step.md``). Each entry
    is the same dot product over the tokens as in the full product; the panels are added straight into
    ``into`` (no [n, n] temporary when ``into`` is given). The result is exactly symmetric off the diagonal
    panels."""
    n = flat.shape[1]
    block = block or max(128, -(-n // 4))
    if n <= block:
        part = flat.T @ flat
        return part if into is None else into.add_(part)
    out = into if into is not None else torch.zeros(n, n, dtype=flat.dtype, device=flat.device)
    ft = flat.T
    for i in range(0, n, block):
        j = min(i + block, n)
        panel = ft[i:j] @ flat[:, i:]  # rows i:j of XᵀX from the diagonal on: [j-i, n-i]
        out[i:j, i:].add_(panel)
        if j < n:
            out[j:, i:j].add_(panel[:, j - i:].T)
    return out


def accumulate(x: torch.Tensor, mode: str, dtype: torch.dtype, into: torch.Tensor | None) -> torch.Tensor:
    """Add the statistic of a batch of inputs ``x[..., in]`` to ``into`` (created when None), in ``dtype``
    even when the forward that fed the hook runs under autocast (``prune.calib_dtype``). ``full``: XᵀX by
    :func:`gram_into` (the upper panels, mirrored)."""
    flat = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    with torch.autocast(device_type=flat.device.type, enabled=False):
        if mode == "full":
            return gram_into(flat, into)
        part = (flat * flat).sum(0)
    return part if into is None else into.add_(part)


class StatsCollector:
    """Context manager: hooks on the given linears of one (or more) blocks accumulate InputStats.

    ``linears`` maps a key (e.g. ``"3.q_proj"`` or ``"q_proj"``) to its module; modules whose short
    name maps to the same input group *within one block prefix* share one statistic, recorded
    once, under the group key (``"3.attn_in"``).

    Batches: call ``set_batch(g)`` before the forward of global calibration batch ``g``; every
    hook call until the next ``set_batch`` adds into leaf ``g``. Batches must arrive as one
    contiguous increasing run per statistic. Without ``set_batch``, every hook call is its own
    leaf (numbered 0, 1, ... per statistic).

    ``partials_device`` (e.g. ``"cpu"``): finished leaves move there, so only the leaf being
    accumulated stays on the accelerator and the ``O(log K)`` partial sums live in host memory
    (additions on the host are exact IEEE additions too: same bits).

    ``reduction="tree"`` (default) keeps the canonical-tree partials (``InputStats.nodes``) for a
    bit-exact distributed reduction; ``"running"`` keeps one running sum (less memory: one
    accumulator instead of up to ``2·log2(K)``; its distributed reduction is deterministic for a
    fixed world size only).
    """

    def __init__(self, linears: dict[str, nn.Module], mode: str = "diag", dtype: torch.dtype = torch.float32,
                 reduction: str = "tree", partials_device: torch.device | str | None = None):
        if mode not in MODES:
            raise StatisticsError(f"unknown statistics mode {mode!r}; use one of {MODES}")
        if reduction not in ("tree", "running"):
            raise StatisticsError(f"unknown reduction {reduction!r}; use 'tree' or 'running'")
        self.mode, self.dtype, self.reduction = mode, dtype, reduction
        self.partials_device = torch.device(partials_device) if partials_device is not None else None
        self._trees: dict[str, TreeSum] = {}
        self._leaf: dict[str, tuple[int, torch.Tensor]] = {}
        self._sums: dict[str, torch.Tensor] = {}  # running reduction
        self._counts: dict[str, int] = {}
        self._auto: dict[str, int] = {}
        self._batch: int | None = None
        self._targets: dict[str, nn.Module] = {}
        for key, module in linears.items():
            gkey = group_key(key)
            self._targets.setdefault(gkey, module)  # the first module of a group records it
        self._handles = []

    @property
    def keys(self) -> list[str]:
        return sorted(self._targets)

    def set_batch(self, index: int) -> None:
        """The global index of the calibration batch whose forward comes next."""
        if index < 0:
            raise StatisticsError(f"batch index must be >= 0, got {index}")
        self._batch = int(index)

    def _flush(self, gkey: str) -> None:
        leaf = self._leaf.pop(gkey, None)
        if leaf is not None:
            idx, value = leaf
            if self.partials_device is not None and value.device != self.partials_device:
                value = value.to(self.partials_device)  # finished leaf: the tree partials live there
            self._trees.setdefault(gkey, TreeSum(inplace=True)).push(idx, value)

    def _hook(self, gkey: str):
        def fn(_module, args):  # a pre-hook: the input is all it reads (a caller may stop the forward after it)
            x = args[0]
            self._counts[gkey] = self._counts.get(gkey, 0) + x.reshape(-1, x.shape[-1]).shape[0]
            if self.reduction == "running":
                self._sums[gkey] = accumulate(x, self.mode, self.dtype, self._sums.get(gkey))
                return
            if self._batch is None:
                idx = self._auto.get(gkey, 0)
                self._auto[gkey] = idx + 1
            else:
                idx = self._batch
            cur = self._leaf.get(gkey)
            if cur is not None and cur[0] == idx:
                accumulate(x, self.mode, self.dtype, cur[1])
                return
            self._flush(gkey)
            self._leaf[gkey] = (idx, accumulate(x, self.mode, self.dtype, None))
        return fn

    def __enter__(self) -> "StatsCollector":
        self._handles = [m.register_forward_pre_hook(self._hook(k)) for k, m in self._targets.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def stats(self, allow_empty: bool = False) -> dict[str, InputStats]:
        """The statistics so far, by group key. ``allow_empty``: a statistic that saw no batch is
        returned empty (a rank with no calibration batch in a distributed reduction) instead of
        raising."""
        for k in list(self._leaf):
            self._flush(k)
        have = set(self._trees) | set(self._sums)
        missing = sorted(set(self._targets) - have)
        if missing and not allow_empty:
            raise StatisticsError(f"no calibration data reached {missing}")
        out: dict[str, InputStats] = {}
        for k in sorted(self._targets):
            if k in self._sums:
                out[k] = InputStats(self._sums[k], self._counts[k], self.mode)
            elif k in self._trees:
                t = self._trees[k]
                out[k] = InputStats(None, self._counts[k], self.mode, nodes=t.nodes(), span=(t.start, t.stop))
            else:
                out[k] = InputStats(None, 0, self.mode, nodes=[], span=None)
        return out

    def max_partials(self) -> int:
        """Peak number of tree partial values held by any one statistic (memory accounting)."""
        return max((t.max_live for t in self._trees.values()), default=0) + (1 if self.reduction == "tree" else 0)


def group_key(key: str) -> str:
    """``"3.q_proj"`` -> ``"3.attn_in"``; ``"q_proj"`` -> ``"attn_in"``."""
    prefix, _, short = key.rpartition(".")
    if short not in INPUT_GROUPS:
        raise StatisticsError(f"unknown module {short!r}; expected one of {sorted(INPUT_GROUPS)}")
    return f"{prefix}.{INPUT_GROUPS[short]}" if prefix else INPUT_GROUPS[short]


def stats_for(stats: dict[str, InputStats], module_key: str) -> InputStats:
    """The statistic a module reads (by its key as given to the collector)."""
    return stats[group_key(module_key)]


def merge_partials(parts: list[InputStats]) -> InputStats:
    """Combine tree partials of consecutive batch ranges (any order given) into the canonical total.

    The pure, in-process version of what ``TorchDistContext.reduce_stats`` does across ranks.
    """
    live = [p for p in parts if p.nodes]
    if not live:
        raise StatisticsError("merge_partials: no partial holds any batch")
    modes = {p.mode for p in parts}
    if len(modes) != 1:
        raise StatisticsError(f"merge_partials: mixed modes {sorted(modes)}")
    tree = TreeSum(inplace=False)
    for p in sorted(live, key=lambda p: p.span[0]):
        tree.extend(p.nodes)
    if tree.start != 0:
        raise StatisticsError(f"merge_partials: batches start at {tree.start}, not 0")
    return InputStats(tree.total(), sum(p.n for p in parts), modes.pop())
