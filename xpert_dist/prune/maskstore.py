"""Masks of every pruned matrix, kept bit-packed on the host (1 bit per weight instead of 8).

At 70B that is ~8 GiB per rank instead of ~64 GiB; a mask is unpacked only when it is read.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import numpy as np
import torch


def pack_mask(keep: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    """(bits, shape): the mask in row-major order, 8 entries per byte, first entry in the high bit
    (``np.packbits``); the last byte is zero-padded."""
    arr = keep.detach().cpu().contiguous().numpy().astype(bool, copy=False)
    return np.packbits(arr.ravel()), tuple(keep.shape)


def unpack_mask(bits: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(bits, count=n).astype(bool).reshape(shape))


class MaskStore(MutableMapping):
    """``name -> bool tensor`` mapping that stores each mask as packed bits."""

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self._packed: dict[str, tuple[np.ndarray, tuple[int, ...]]] = {}
        for k, v in (masks or {}).items():
            self[k] = v

    def __setitem__(self, name: str, keep: torch.Tensor) -> None:
        self._packed[name] = pack_mask(keep)

    def __getitem__(self, name: str) -> torch.Tensor:
        return unpack_mask(*self._packed[name])

    def packed(self, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
        """(bits, shape) as stored (see `pack_mask`), without unpacking."""
        return self._packed[name]

    def set_packed(self, name: str, bits: np.ndarray, shape: tuple[int, ...]) -> None:
        n = int(np.prod(shape))
        if bits.dtype != np.uint8 or bits.ndim != 1 or bits.size != (n + 7) // 8:
            raise ValueError(f"mask {name}: {bits.size} packed bytes do not fit shape {tuple(shape)}")
        self._packed[name] = (bits, tuple(int(d) for d in shape))

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def copy(self) -> "MaskStore":
        out = MaskStore()
        out._packed = dict(self._packed)  # entries are replaced, never mutated, so a shallow copy is safe
        return out

    def nbytes(self) -> int:
        return sum(b.nbytes for b, _ in self._packed.values())
