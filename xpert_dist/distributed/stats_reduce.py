"""Reduce a prune step's statistics to their owner ranks: what :meth:`TorchDistContext.reduce_stats` runs.

Every rank describes its partials of each statistic (mode, kind, span of global batches, tokens, shape,
dtype); the descriptions are all-gathered and checked (same keys, modes, shapes; the tree partials tile
the batches ``0..K`` contiguously); owners are assigned by bytes (``owners.assign_owners``, shifted by the
caller's rotation). A statistic of at least ``ctx.scatter_min_bytes`` on at least ``ctx.scatter_min_world``
ranks is reduced by reduce-scatter + gather (``scatter_reduce.py``); the others travel whole to the owner,
which folds them canonically (:func:`combine_at_owner`). The owner keeps the full statistic; every rank
gets ``n`` and the diagonal (the whole statistic in ``diag`` mode or with ``replicate``).
"""
from __future__ import annotations

import torch

from ..errors import DistributedError, StatisticsError
from ..stats.capture import InputStats
from ..stats.tree import Node, TreeSum, maximal_nodes
from .comm import message_dtype
from .owners import assign_owners
from .scatter_reduce import scatter_combine


def reduce_stats(ctx, stats: dict[str, InputStats], replicate: bool, shift: int
                 ) -> tuple[dict[str, InputStats], dict[str, int]]:
    """(the reduced statistics, their owner ranks); ``shift``: the owners of ``assign_owners`` move by this many
    ranks. The input partials are consumed."""
    keys = sorted(stats)
    mine = {}
    for k in keys:
        st = stats[k]
        if st.nodes is not None:
            kind = "tree" if st.nodes else "empty"
        else:
            kind = "running" if st.resident else "empty"
        shape = list(st.shape) if kind != "empty" else None
        dtype = str((st.nodes[0].value if kind == "tree" else st.sum).dtype) if kind != "empty" else None
        mine[k] = (st.mode, kind, st.span if kind == "tree" else None, st.n, shape, dtype)
    metas = ctx.all_gather_object({"keys": keys, "meta": mine}, op="reduce_stats (metadata)")
    for r, m in enumerate(metas):
        if m["keys"] != keys:
            raise DistributedError(f"reduce_stats: rank {r} has statistics {m['keys']} but rank {ctx.rank} "
                                   f"has {keys}; every rank must reduce the same keys")
    sizes, info = {}, {}
    for k in keys:
        per = [m["meta"][k] for m in metas]
        modes = {p[0] for p in per}
        live = [(r, p) for r, p in enumerate(per) if p[1] != "empty"]
        if len(modes) != 1:
            raise DistributedError(f"reduce_stats: statistic {k!r} has modes {sorted(modes)} on different ranks")
        if not live:
            raise StatisticsError(f"no calibration data reached {k!r} on any of the {ctx.world_size} ranks")
        kinds = {p[1] for _, p in live}
        if len(kinds) != 1:
            raise DistributedError(f"reduce_stats: statistic {k!r} mixes tree and running partials")
        shapes = {tuple(p[4]) for _, p in live}
        dtypes = {p[5] for _, p in live}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise DistributedError(f"reduce_stats: statistic {k!r} has shapes {sorted(shapes)} / dtypes "
                                   f"{sorted(dtypes)} on different ranks")
        kind = kinds.pop()
        if kind == "tree":
            live.sort(key=lambda rp: rp[1][2][0])
            stop = 0
            for r, p in live:
                if p[2][0] != stop:
                    raise StatisticsError(
                        f"reduce_stats: the batches of {k!r} are not one contiguous run from 0: rank {r} "
                        f"starts at batch {p[2][0]}, expected {stop}")
                stop = p[2][1]
        shape, dtype = shapes.pop(), message_dtype(dtypes.pop())
        info[k] = (modes.pop(), kind, live, shape, dtype, sum(p[3] for p in per))
        numel = 1
        for s in shape:
            numel *= s
        sizes[k] = numel * torch.empty((), dtype=dtype).element_size()
    owners = assign_owners(sizes, ctx.world_size)
    owners = {k: (r + shift) % ctx.world_size for k, r in owners.items()}

    totals: dict[str, torch.Tensor] = {}
    for k in keys:
        mode, kind, live, shape, dtype, n = info[k]
        owner = owners[k]
        if ctx.world_size >= max(2, ctx.scatter_min_world) and sizes[k] >= ctx.scatter_min_bytes:
            total = scatter_combine(ctx, k, kind, live, shape, dtype, stats[k], owner)
            if ctx.rank == owner:
                totals[k] = total
        elif ctx.rank == owner:
            totals[k] = combine_at_owner(ctx, k, kind, live, shape, dtype, stats[k])
        elif any(r == ctx.rank for r, _ in live):
            local = stats[k]
            values = [nd.value for nd in local.nodes] if kind == "tree" else [local.sum]
            for j, v in enumerate(values):
                ctx._send(v.to(ctx.device), owner, f"reduce_stats: send {k!r} part {j} to rank {owner}")
        stats[k].nodes = None if kind == "tree" else stats[k].nodes

    out: dict[str, InputStats] = {}
    for k in keys:
        mode, kind, live, shape, dtype, n = info[k]
        owner = owners[k]
        full = replicate or mode == "diag"
        if ctx.rank == owner:
            payload = totals[k] if full else totals[k].diagonal().contiguous()
        else:
            payload = torch.empty(shape if full else shape[:1], dtype=dtype, device=ctx.device)
        ctx._broadcast(payload, owner, f"reduce_stats: broadcast {k!r} from rank {owner}")
        if ctx.rank == owner:
            out[k] = InputStats(totals[k], n, mode)
        elif full:
            out[k] = InputStats(payload, n, mode)
        else:
            out[k] = InputStats(None, n, mode, diag=payload, owner=owner)
    return out, owners


def combine_at_owner(ctx, key, kind, live, shape, dtype, local: InputStats) -> torch.Tensor:
    """On ``key``'s owner: receive every rank's partials of ``key`` (in global batch order) and fold them canonically."""
    if kind == "running":  # one opaque partial per rank, summed in rank order
        acc = None
        for r, _ in sorted(live):
            if r == ctx.rank:
                v = local.sum.to(ctx.device)
            else:
                v = torch.empty(shape, dtype=dtype, device=ctx.device)
                ctx._recv(v, r, f"reduce_stats: receive {key!r} from rank {r}")
            acc = v.clone() if acc is None else acc + v
        return acc
    tree = TreeSum(inplace=False)
    for r, p in live:
        if r == ctx.rank:
            for nd in local.nodes:
                tree.push_node(Node(nd.level, nd.index, nd.value.to(ctx.device)))
            continue
        for j, (level, index) in enumerate(maximal_nodes(*p[2])):
            buf = torch.empty(shape, dtype=dtype, device=ctx.device)
            ctx._recv(buf, r, f"reduce_stats: receive {key!r} part {j} from rank {r}")
            tree.push_node(Node(level, index, buf))
    return tree.total()
