"""Bit-packing of masks (the masked adapter's on-device mask)."""
import numpy as np
import pytest
import torch

from xpert_dist.errors import StatisticsError
from xpert_dist.maths.bits import pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (16, 33)])
def test_pack_is_numpy_packbits_and_round_trips(shape):
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < 0.4
    packed = pack_bits(mask)
    want = np.packbits(mask.numpy().ravel())  # the host MaskStore's and the masks file's layout
    assert packed.dtype == torch.uint8 and np.array_equal(packed.numpy(), want)
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_wrong_sizes_refused():
    with pytest.raises(StatisticsError):
        pack_bits(torch.zeros(3))
    with pytest.raises(StatisticsError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), (4, 5))
