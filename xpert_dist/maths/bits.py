"""Bit-packing of boolean masks on any device: 1 bit per weight instead of torch.bool's 8.

Layout: the mask is flattened row-major and padded with False to a multiple of 8; byte ``k`` holds
entries ``8k .. 8k+7``, the first in the high bit: numpy's default ``packbits``, i.e. the same bytes
as the host-side ``prune.maskstore.pack_mask`` and the masks file, so one layout serves everywhere.
"""
from __future__ import annotations

import torch
from torch import Tensor

from xpert_dist.errors import StatisticsError

__all__ = ["pack_bits", "unpack_bits"]


def _weights(device) -> Tensor:
    return torch.ones(8, dtype=torch.uint8, device=device) << torch.arange(7, -1, -1, dtype=torch.uint8, device=device)


def pack_bits(mask: Tensor) -> Tensor:
    """``bool`` tensor of any shape -> ``uint8 [ceil(numel/8)]`` on the same device."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise StatisticsError(f"pack_bits needs a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _weights(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: ``uint8`` bytes -> ``bool`` tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= int(s)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-n // 8):
        raise StatisticsError(f"packed mask of {packed.numel()} {packed.dtype} bytes does not hold shape {tuple(shape)}")
    bits = (packed[:, None] & _weights(packed.device)[None, :]) != 0
    return bits.reshape(-1)[:n].reshape(shape)
