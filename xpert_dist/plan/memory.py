"""Per-rank peak memory of a training step and of a prune step, term by term.

Every term is an explicit formula of the model shape and the run settings; the few constants that
are not (framework baselines, allocator slack) are named fields of :class:`Constants`, documented
with where their values come from. ``estimate(spec)`` returns a :class:`Plan` holding the terms,
the per-rank accelerator and host peaks of both steps, whether they fit, and what to change.

What lives where (as the code in this repository does it):

* ZeRO-3 partitions base and LoRA weights over the W ranks (``/W``), gathers one module at a time
  during forward/backward plus a prefetch bucket, and the whole current block (and, for
  ForeSight, the next block's consumers) inside a prune step. ``--offload-params cpu`` keeps the
  partitions in host memory. ZeRO-1/2 and stage 0 keep full weight replicas.
* The optimizer holds an fp32 master copy and AdamW's two moments (12 bytes per trainable
  parameter), partitioned from stage 1 on, in host memory with ``--offload-optimizer cpu``.
* Activations: per token and per decoder layer (measured with saved-tensor hooks on transformers
  5.24 + peft LoRA on all seven linears, SDPA attention; :func:`layer_activation_bytes`), plus the
  logits/loss; with gradient checkpointing only each layer's input is kept, and one layer is
  recomputed at a time.
* Prune step (sequential calibration): the hidden states entering and leaving the current block
  for this rank's calibration batches stay in host memory; statistics are accumulated per group
  of the current block as canonical-tree partials (up to ``⌊log2 K_local⌋+2`` accumulators), on
  the accelerator or, with ``--stats-offload cpu|disk``, on the host; the owner then holds the
  reduced statistic of its largest group plus the solver workspace of the largest module. On 3+
  ranks a statistic of 16 MiB or more is reduced by reduce-scatter (``distributed/scatter_reduce.py``):
  while every rank still holds its own partials it receives its row chunk of every other rank's.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..errors import ConfigError
from .advice import suggest
from .shapes import GiB, LINEARS, ModelShape  # noqa: F401  (GiB re-exported)
from .spec import DTYPE_BYTES, METHODS, PBS, Constants, Plan, PlanSpec, Term  # noqa: F401


# ----------------------------------------------------------------------------- building blocks
def layer_activation_bytes(m: ModelShape, r: int, dropout: float, b: int, n_lora: int = 7) -> float:
    """Bytes kept for backward per token by one decoder layer (LoRA on the linears, frozen base).

    Measured with ``torch.autograd.graph.saved_tensors_hooks`` (unique storages, parameters
    excluded) on transformers 5.24 / torch 2.13 / peft 0.21, SDPA attention, and exact on two
    shapes (h576/I1536/GQA 9:3 and h256/I768/4:2), checked on a third in tests/plan:
    two RMSNorms (fp32 input copy + rsqrt + output), q/k/v after RoPE and the attention output
    (SDPA saves q, k, v, out and the fp32 log-sum-exp per head), SwiGLU (gate, silu(gate), up,
    their product), the r-wide LoRA intermediates, and with dropout > 0 the dropped-out inputs
    of every LoRA A (measured ``9h + q + I`` elements).
    """
    h, i, q, kv = m.hidden, m.intermediate, m.q_dim, m.kv_dim
    norms = 2 * (4 * h + 4 + b * h)
    attn = b * (2 * q + 2 * kv) + 4 * m.heads
    mlp = b * 4 * i
    lora = b * n_lora * r
    drop = b * (9 * h + q + i) if dropout > 0 else 0
    return norms + attn + mlp + lora + drop


def logits_bytes_per_token(m: ModelShape, b: int) -> float:
    """Peak of the loss in backward (measured on CPU, fp32): the saved fp32 log-softmax, its
    gradient and the gradient of its input live together (12 B per vocab entry), plus the
    gradient cast back to the logits' dtype when the model is not fp32 (b)."""
    return m.vocab * (12 + (b if b < 4 else 0))


def tree_peak_partials(start: int, stop: int) -> int:
    """Peak number of partial sums a canonical-tree accumulator holds for leaves [start, stop),
    plus the leaf being accumulated (simulated: the exact count of ``stats.tree.TreeSum``)."""
    if stop <= start:
        return 0
    stack: list[tuple[int, int]] = []
    peak = 0
    for g in range(start, stop):
        cur = (0, g)
        while stack and stack[-1][0] == cur[0] and stack[-1][1] % 2 == 0 and stack[-1][1] + 1 == cur[1]:
            top = stack.pop()
            cur = (cur[0] + 1, top[1] // 2)
        stack.append(cur)
        peak = max(peak, len(stack))
    return peak + 1


def _shard(k: int, w: int, r: int) -> tuple[int, int]:
    return r * k // w, (r + 1) * k // w


# ----------------------------------------------------------------------------- the plan
def estimate(spec: PlanSpec) -> Plan:
    spec.validate()
    m, c = spec.model, spec.constants
    W = spec.world
    b = DTYPE_BYTES[spec.dtype]
    sb = DTYPE_BYTES[spec.stats_dtype] if spec.stats_dtype in DTYPE_BYTES else 8
    cpu_case = spec.accelerator == "cpu"
    accel = "host" if cpu_case else "accel"
    z = spec.zero_stage
    terms: list[Term] = []

    def add(step, phase, where, name, nbytes, formula):
        terms.append(Term(step, phase, "host" if (cpu_case and where == "accel") else where, name,
                          float(nbytes), formula))

    P = m.total_params()
    P_lora = m.lora_params(spec.lora_r, spec.lora_targets)
    P_block = m.block_params()
    part = W if z == 3 else 1
    T = spec.micro_batch * spec.seq_len

    # ------------------------------------------------------------------ resident model state (both steps)
    for step in ("train", "prune"):
        where_p = "host" if spec.offload_params == "cpu" else accel
        add(step, "resident", where_p, "base weights" + (" (ZeRO-3 shard)" if z == 3 else " (replica)"),
            P * b / part, f"P·{b}B{'/W' if z == 3 else ''} = {P:,}·{b}/{part}")
        add(step, "resident", where_p, "LoRA weights", P_lora * b / part, f"P_lora·{b}B{'/W' if z == 3 else ''}")
        gpart = W if z >= 2 else 1
        add(step, "resident", accel, "LoRA gradients", P_lora * (b + 4 / gpart),
            f"P_lora·({b}B full + 4B fp32{'/W' if z >= 2 else ''} partition)")
        opart = W if z >= 1 else 1
        where_o = "host" if spec.offload_optimizer == "cpu" else accel
        add(step, "resident", where_o, "optimizer (fp32 master + AdamW m, v)", P_lora * 12 / opart,
            f"P_lora·12B{'/W' if z >= 1 else ''}")
        if cpu_case:
            add(step, "resident", "host", "framework baseline (CPU rank)", c.host_baseline_bytes_cpu,
                "Constants.host_baseline_bytes_cpu (calibrated)")
        else:
            add(step, "resident", "accel", "CUDA context + NCCL", c.accel_baseline_bytes,
                "Constants.accel_baseline_bytes (assumed)")
            add(step, "resident", "host", "framework baseline (CUDA rank)", c.host_baseline_bytes_gpu,
                "Constants.host_baseline_bytes_gpu (assumed)")

    # ------------------------------------------------------------------ training step
    gloo = cpu_case  # gloo's all-gather stages through a second full-size output buffer (measured)
    biggest = max(m.embed_params(), P_block)
    if z == 3 and W > 1:  # with W = 1 DeepSpeed's fetch skips the all-gather (the partition is the parameter)
        live = min(biggest + min(spec.prefetch_bucket_params, P_block), P)  # never more than the whole model
        add("train", "compute", accel, "ZeRO-3 gathered parameters", live * b,
            "min(max(V·h, block) + min(prefetch bucket, block), P)·b")
        if gloo:
            add("train", "compute", "host", "gloo all-gather staging buffer", biggest * b, "max(V·h, block)·b")
    per_layer = layer_activation_bytes(m, spec.lora_r, spec.lora_dropout, b, len(spec.lora_targets))
    if spec.grad_checkpointing:
        add("train", "compute", accel, "activations (checkpointed inputs)", m.layers * T * m.hidden * b,
            "L·T·h·b")
        add("train", "compute", accel, "activations (one recomputed layer)", T * per_layer, "T·layer_bytes")
    else:
        add("train", "compute", accel, "activations", m.layers * T * per_layer,
            f"L·T·layer_bytes, layer_bytes = {per_layer:,.0f} B/token")
    add("train", "compute", accel, "logits + loss", T * logits_bytes_per_token(m, b), "T·V·(12 [+ b if b < 4])")
    if spec.method != "none":  # the masked adapter (prune.mask_final != end)
        # no resident mask: on a float base the mask is read from the pruned weight's support (W != 0,
        # models/lora.support_is_mask), so it is partitioned with the weight; only a module with a kept
        # weight that is exactly 0 stores its bits (numel/8 B): a zero weight scores 0 and is pruned first,
        # and kept weights are merged with the adapter or reconstructed, so that is the exception
        lin = m.linear_shapes()
        big_out, big_in = max(lin.values(), key=lambda oi: oi[0] * oi[1])
        add("train", "compute", accel, "masked delta s·(BA)⊙M + its gradient (largest module, transient)",
            2 * big_out * big_in * b + big_out * big_in, "2·out·in·b + out·in (unpacked bool mask)")

    # ------------------------------------------------------------------ prune step
    bs = spec.calib_batch or spec.micro_batch
    K = math.ceil(spec.calib_samples / bs)
    K_local = max(_shard(K, W, r)[1] - _shard(K, W, r)[0] for r in range(W))
    rows_local = min(K_local * bs, spec.calib_samples)
    if spec.propagate == "true_sequential":  # at the block's last stage: its inputs, o_proj's output, down_proj's
        # input and the block's outputs (o_proj's input, 2h + q with the first two, is dropped before)
        add("prune", "resident", "host", "calibration activations (block in, o_proj out, down_proj in, block out)",
            rows_local * spec.seq_len * (3 * m.hidden + m.intermediate) * b,
            f"{rows_local} rows·S·(3h + I)·b (host, this rank's batches)")
    else:
        add("prune", "resident", "host", "calibration hidden states (block in + out)",
            2 * rows_local * spec.seq_len * m.hidden * b, f"2·{rows_local} rows·S·h·b (host, this rank's batches)")
    if z == 3:
        add("prune", "capture", accel, "gathered embedding (capturing block-0 inputs)", m.embed_params() * b,
            "V·h·b")
        if gloo:
            add("prune", "capture", "host", "gloo all-gather staging (embedding)", m.embed_params() * b, "V·h·b")
        add("prune", "resident", accel, "gathered block weights", P_block * b, "block params·b")
        if gloo:
            add("prune", "accumulate", "host", "gloo all-gather staging (block)", P_block * b, "block params·b")
    next_block = spec.method == "foresight" and m.layers > 1  # the last block has no consumers to gather
    n_lin = m.block_linear_params()
    nxt = m.block_linear_params(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) if next_block else 0
    if z == 3 and next_block:
        add("prune", "solve", accel, "gathered next block (ForeSight consumers)", P_block * b * (2 if gloo else 1),
            "block params·b" + (" (x2: gloo staging)" if gloo else ""))
    Tb = bs * spec.seq_len
    add("prune", "accumulate", accel, "block forward (no grad, one batch)",
        Tb * b * (3 * m.hidden + m.q_dim + 2 * m.kv_dim + 3 * m.intermediate), "T_b·b·(3h + q + 2kv + 3I)")

    needs_full = spec.method == "sparsegpt" or spec.pbs in ("full", "shared") or "obs" in (spec.reconstruct,
                                                                                           spec.saliency)
    needs_stats = spec.method != "magnitude" or spec.pbs != "off"
    shapes = m.linear_shapes()
    largest_mod = max(shapes, key=lambda n: shapes[n][0] * shapes[n][1])
    lo, li = shapes[largest_mod]
    gmod = max(shapes, key=lambda n: (shapes[n][1], shapes[n][0]))  # widest input: SparseGPT's in² terms
    go, gi = shapes[gmod]
    if needs_stats:
        dims = m.group_dims()
        group_bytes = {g: (d * d if needs_full else d) * sb for g, d in dims.items()}
        partials = max(tree_peak_partials(*_shard(K, W, r)) for r in range(W))
        total_group = sum(group_bytes.values())
        where_s = "host" if spec.stats_offload in ("cpu", "disk") else accel
        if where_s == "host":
            add("prune", "accumulate", accel, "statistics leaf (current batch, all groups)", total_group,
                "Σ_groups size·stats bytes")
            add("prune", "accumulate", "host", f"statistics tree partials ({partials - 1} accumulators)",
                (partials - 1) * total_group, "peak partials·Σ_groups size")
        else:
            add("prune", "accumulate", accel, f"statistics tree partials ({partials} incl. leaf)",
                partials * total_group, "peak partials·Σ_groups (d² full | d diag)·stats bytes")
        big = max(group_bytes.values())
        reduce_held = False
        from ..distributed.multirank import SCATTER_MIN_BYTES, SCATTER_MIN_WORLD
        from ..stats.tree import maximal_nodes

        if W >= max(2, SCATTER_MIN_WORLD) and big >= SCATTER_MIN_BYTES:
            # distributed/scatter_reduce.py: every rank receives its row chunk of every other rank's
            # partials (its maximal tree nodes) at once, while its own partials of every group are still held
            g_big = max(group_bytes, key=group_bytes.get)
            row = group_bytes[g_big] / dims[g_big]  # d·stats bytes (full) or stats bytes (diagonal)
            chunk = math.ceil(dims[g_big] / W) * row
            nodes = max(len(maximal_nodes(*_shard(K, W, r))) for r in range(W))
            add("prune", "reduce", where_s, f"own statistics partials during the reduction ({nodes} per group)",
                nodes * total_group, "maximal tree nodes·Σ_groups")
            sends = 2 if where_s == "host" else 1  # host partials: the sent chunks are device copies until sent
            add("prune", "reduce", accel, "reduce-scatter chunk buffers (largest group)",
                max(sends * (W - 1) * nodes * chunk, chunk),
                f"max({sends}·(W-1)·{nodes} nodes·⌈d/W⌉·row bytes received{' + sent' if sends == 2 else ''}, "
                f"folded chunk) ({g_big})")
            reduce_held = True
        elif W > 1:
            add("prune", "solve", accel, "reduction receive buffer (owner)", big, "largest group")
        if spec.stats_offload == "disk":
            add("prune", "solve", "disk", "finished statistics (one block)", total_group, "Σ_groups")
        from ..distributed.owners import assign_owners

        owners = assign_owners(group_bytes, W)
        held = max(sum(v for g, v in group_bytes.items() if owners[g] == r) for r in range(W))
        diag_rest = sum(d * sb for g, d in dims.items()) if needs_full else 0
        add("prune", "solve", accel, "reduced statistics held (worst owner) + diagonals", held + diag_rest,
            "Σ owned groups (assign_owners) + Σ_groups d·stats bytes")
        if spec.hessian_carry and needs_full:  # block i's owners are assign_owners' shifted by i ranks
            carried = [0.0] * W
            for i in range(m.layers):
                for g, v in group_bytes.items():
                    carried[(owners[g] + i) % W] += v * 4 / sb
            where_c = {"none": accel, "cpu": "host", "disk": "disk"}[spec.stats_offload]
            add("prune", "resident", where_c, "carried XᵀX of every block (prune.hessian_carry, worst owner)",
                max(carried), "max over ranks of Σ_blocks Σ groups owned·4B (float32; block i's owners: "
                "assign_owners shifted by i)")
        if reduce_held:  # bound: the owner may already hold every group it owns when the largest is reduced
            add("prune", "reduce", accel, "reduced statistics held (worst owner)", held,
                "Σ owned groups (assign_owners)")
    add("prune", "solve", accel, "effective weights U (fp32)", (n_lin + nxt) * 4,
        "block linears (+ next block's q,k,v,gate,up for ForeSight)·4B")
    if spec.method != "sparsegpt":
        add("prune", "solve", accel, "scores (fp32, all modules of the block)", n_lin * 4, "block linears·4B")
        add("prune", "solve", accel, "mask selection workspace (largest module)", lo * li * 14,
            f"{largest_mod}: out·in·(4 sorted + 8 indices + 2 bool)")
    sd = DTYPE_BYTES.get(spec.solver_dtype, 8)
    if spec.method == "sparsegpt" or spec.reconstruct == "obs":  # SparseGPT's solver (on the chosen mask for obs)
        what = "SparseGPT" if spec.method == "sparsegpt" else "OBS reconstruction"
        add("prune", "solve", accel, f"{what} workspace (largest-input module, {spec.solver_dtype})",
            2 * gi * gi * sd + go * gi * (sd + 2),
            f"{gmod}: 2·in²·{sd} (two of damped H, its factor, H⁻¹, H⁻¹'s factor) + out·in·({sd} W copy + 2 masks)")
    elif spec.saliency == "obs":  # scores.obs_column_factor: only the diagonal of (H+λI)⁻¹ is kept
        add("prune", "solve", accel, f"OBS saliency workspace (largest-input module, {spec.solver_dtype})",
            2 * gi * gi * sd, f"{gmod}: 2·in²·{sd} (two of damped H, its factor, H⁻¹, H⁻¹'s factor)")
    r = spec.lora_r
    if spec.pbs == "diagonal":
        add("prune", "solve", accel, "PBS diagonal workspace", 2 * lo * li * 4, "2·out·in·4")
    elif spec.pbs == "shared" or (spec.pbs == "full" and spec.pbs_support == "dense"):
        add("prune", "solve", accel, f"PBS {spec.pbs} workspace", 2 * lo * li * 4 + 2 * r * li * 4,
            "2·out·in·4 (U⊙P, (U⊙P)H) + 2·r·in·4")
    elif spec.pbs == "full":  # kept support: per-row Grams in chunks of rows
        chunk = max(1, (1 << 24) // max(1, r * li))
        add("prune", "solve", accel, "PBS full (kept support) workspace",
            lo * li * 4 + 2 * min(chunk, lo) * r * li * 4, "out·in·4 + 2·chunk·r·in·4")
    if spec.method == "sparsegpt" or spec.reconstruct == "obs":  # the owners' reconstructed weights travel too
        add("prune", "solve", accel, "masks + reconstructed weights of the block (broadcast)", n_lin * 5,
            "block linears·(1B mask + 4B fp32 weight)")
    else:
        add("prune", "solve", accel, "masks + results of the block (bool, broadcast)", n_lin, "block linears·1B")
    if spec.method == "foresight" and spec.ema:
        ema_where = {"none": accel, "cpu": "host", "disk": "disk"}[spec.stats_offload]
        add("prune", "resident", ema_where, "ForeSight EMA scores (owned modules, all blocks)",
            math.ceil(m.layers / W) * n_lin * 4, "⌈L/W⌉·block linears·4B (owners rotate across blocks; "
            "prune.offload places them)")
    add("prune", "resident", "host", "kept masks of every module (bit-packed, every rank)",
        -(-m.layers * n_lin // 8), "L·block linears/8 B (Pruner.masks, a MaskStore)")

    # ------------------------------------------------------------------ peaks
    peaks, fits = {}, {}
    for step, phases in (("train", ("compute",)), ("prune", ("capture", "accumulate", "reduce", "solve"))):
        res = {}
        for where in ("accel", "host", "disk"):
            base = sum(t.bytes for t in terms if t.step == step and t.where == where and t.phase == "resident")
            extra = max([sum(t.bytes for t in terms if t.step == step and t.where == where and t.phase == ph)
                         for ph in phases] + [0.0])
            total = base + extra
            if where == "accel":
                total *= c.allocator_slack
            if where == "host" and cpu_case:
                total *= c.cpu_allocator_slack
            res[where] = total
        res["host_node"] = res["host"] * (1 if cpu_case else spec.gpus_per_node)
        peaks[step] = res
        fits[step] = {"accel": cpu_case or res["accel"] <= spec.gpu_mem_gb * GiB * c.headroom,
                      "host": res["host_node"] <= spec.host_mem_gb * GiB * c.headroom}
    return Plan(spec, terms, peaks, fits, suggest(spec, terms, peaks, fits))
