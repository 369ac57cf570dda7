"""Merge LoRA into the base and export a Hugging Face checkpoint, the masks and the adapter.

The merged weight of every pruned matrix is checked against its mask before anything is written:
pruned entries must be exactly zero (merging never re-densifies) and the count must be the
target's. Everything is written into a temporary directory and renamed into place.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..distributed.context import DistContext
from ..errors import XpertError
from ..models import structure as st
from ..utils.atomic import atomic_dir

log = logging.getLogger(__name__)


class SparsityCheckError(XpertError, RuntimeError):
    """The merged model does not have the masks' sparsity."""


def merged_state_dict(model: nn.Module, ctx: DistContext) -> dict[str, torch.Tensor]:
    """Full, merged (W + s·B·A) state dict with plain ``transformers`` names, on every rank's CPU.

    Gathers one module at a time under ZeRO-3, so peak memory is one module beyond the shards.
    """
    inner = st.unwrap(model)
    sd: dict[str, torch.Tensor] = {}
    skip: set[str] = set()
    seen: set[int] = set()
    for name, module in inner.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        quantized = st.quantization_of(module) is not None
        if hasattr(module, "base_layer") or quantized:  # a peft LoRA layer (merge it) or a bnb layer
            skip.add(name)
            base = st.base_linear(module)
            dtype = torch.float32 if quantized else base.weight.dtype
            with ctx.gather(list(module.parameters())):
                sd[f"{name}.weight"] = st.effective_weight(module, dtype=torch.float32).to(dtype).cpu()
                if base.bias is not None:
                    sd[f"{name}.bias"] = base.bias.detach().clone().cpu()
            continue
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        if not params:
            continue
        with ctx.gather([p for _, p in params]):
            for n, p in params:
                seen.add(id(p))
                sd[f"{name}.{n}" if name else n] = p.detach().clone().cpu()
    return sd


def check_sparsity(sd: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                   expected: dict[str, float] | None = None) -> dict[str, float]:
    """Per-matrix fraction of zeros; raises if a pruned entry is non-zero or a count is off."""
    out = {}
    for name, keep in masks.items():
        W = sd[f"{name}.weight"]
        if W.shape != keep.shape:
            raise SparsityCheckError(f"{name}: weight shape {tuple(W.shape)} != mask shape {tuple(keep.shape)}")
        leaked = int((W[~keep] != 0).sum())
        if leaked:
            raise SparsityCheckError(f"{name}: {leaked} pruned entries are non-zero after merging")
        if expected is not None and name in expected:
            want = round(expected[name] * keep.numel())
            got = int((~keep).sum())
            if got != want:
                raise SparsityCheckError(f"{name}: {got} pruned entries, expected {want}")
        out[name] = float((W == 0).sum()) / W.numel()
    return out


def save_hf_checkpoint(sd: dict[str, torch.Tensor], model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """Write ``sd`` as a safetensors checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads."""
    from transformers import AutoModelForCausalLM

    from ..distributed.zero import zero3_init_enabled

    if zero3_init_enabled():  # from_config would become a collective on this one rank (a hang)
        raise XpertError("export: DeepSpeed zero.Init is still enabled (an HfDeepSpeedConfig outlived the "
                         "model load); load under distributed.zero.partitioned_loading")
    config = copy.deepcopy(st.unwrap(model).config)
    if getattr(config, "quantization_config", None) is not None:  # QLoRA base: the export is dense
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(sd, strict=False, assign=True)
    if unexpected:
        raise XpertError(f"export: unexpected keys {unexpected[:5]}")
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        raise XpertError(f"export: missing keys {sorted(set(missing) - tied)[:5]}")
    if tied:
        plain.tie_weights()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
    log.info("exported merged model to %s", out_dir)
    return out_dir


MASKS_FORMAT = "xpert-dist-masks/packbits-v1"


def save_masks(masks, path: str | Path) -> Path:
    """Write the pruning masks (``name -> bool tensor`` or a `MaskStore`) bit-packed: 1 bit per weight.

    ``masks.safetensors`` holds one uint8 tensor per matrix, the mask in row-major order packed 8
    entries per byte, first entry in the high bit (``numpy.packbits``, as `MaskStore` keeps it), and
    the metadata ``format`` (`MASKS_FORMAT`) and ``shapes`` (JSON ``{name: shape}``). Read it back
    with `load_masks`. The manifest's ``mask_sha256[name]`` is
    ``sha256(str(tuple(shape)).encode() + packed bytes)``: a hash of the unpacked boolean mask (its
    shape and its entries in row-major order), which equals the hash of the stored bytes. Written
    to a temporary name beside ``path`` and renamed into place.
    """
    import json
    import os
    import tempfile

    from safetensors.torch import save_file

    from ..prune.maskstore import MaskStore

    store = masks if isinstance(masks, MaskStore) else MaskStore(masks)
    tensors, shapes = {}, {}
    for name in sorted(store):
        bits, shape = store.packed(name)
        tensors[name] = torch.from_numpy(bits.copy())
        shapes[name] = list(shape)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": MASKS_FORMAT, "shapes": json.dumps(shapes)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_masks(path: str | Path, *, packed: bool = False):
    """Read ``masks.safetensors`` -> ``{name: bool tensor}`` (``packed=True``: a `MaskStore`, which
    keeps them at 1 bit per weight). Files from before bit-packing (one bool per weight, no
    ``format`` metadata) still load. Raises `ConfigError` naming the file when it is missing or is
    not a masks file."""
    import json

    from safetensors import SafetensorError, safe_open

    from ..errors import ConfigError
    from ..prune.maskstore import MaskStore

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"masks file {path} does not exist")
    store = MaskStore()
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            fmt = meta.get("format")
            if fmt == MASKS_FORMAT:
                shapes = json.loads(meta["shapes"])
                for name in f.keys():
                    store.set_packed(name, f.get_tensor(name).numpy(), tuple(shapes[name]))
            elif fmt is None:  # the unpacked format: one bool per weight
                for name in f.keys():
                    t = f.get_tensor(name)
                    if t.dtype != torch.bool:
                        raise ConfigError(f"masks file {path}: {name} is {t.dtype}, not a mask "
                                          f"(no format metadata, so bool tensors were expected)")
                    store[name] = t
            else:
                raise ConfigError(f"masks file {path}: unknown format {fmt!r} (this version reads {MASKS_FORMAT})")
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"masks file {path} is not readable: {e}") from e
    return store if packed else {name: store[name] for name in store}


def mask_file_sha256(path: str | Path) -> dict[str, str]:
    """``{name: mask_sha256}`` of a masks file, as the manifest records it (see `save_masks`)."""
    import hashlib

    store = load_masks(path, packed=True)
    out = {}
    for name in sorted(store):
        bits, shape = store.packed(name)
        out[name] = hashlib.sha256(str(tuple(shape)).encode() + bits.tobytes()).hexdigest()
    return out


def save_adapter(model: nn.Module, ctx: DistContext, out_dir: str | Path) -> None:
    """The LoRA adapter (gathered), as a peft adapter directory."""
    sd = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            with ctx.gather([p]):
                sd[name] = p.detach().clone().cpu()
    if ctx.rank == 0:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, state_dict=sd)
