"""tree_all_reduce (the reproducibility mode's gradient sum): every rank gets the bits of the
single-process canonical tree sum, for uneven contiguous splits over 1-3 ranks."""
import sys

import numpy as np
import pytest
import torch

from helpers import REPO

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.distributed import tree_workers  # noqa: E402
from tests.distributed.harness import ok, run_ranks  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world,n_leaves", [(2, 6), (3, 7)])
def test_every_rank_gets_the_canonical_sum(world, n_leaves):
    from xpert_dist.stats.tree import canonical_sum

    values = [tree_workers.leaf(g) for g in range(n_leaves)]
    want = canonical_sum(values).numpy().tobytes()
    exact = torch.stack([v.double() for v in values]).sum(0)
    got = ok(run_ranks(tree_workers.tree_all_reduce_worker, world, n_leaves, timeout=120))
    for r in range(world):
        assert got[r] == want, f"rank {r}: not the canonical tree's bits"
    g = torch.from_numpy(np.frombuffer(got[0], dtype=np.float32).copy()).double()
    torch.testing.assert_close(g, exact, rtol=1e-5, atol=1e-4)
    # the order matters at all (else the test could not fail): left-to-right sums differ somewhere
    seq = values[0].clone()
    for v in values[1:]:
        seq = seq + v
    assert seq.numpy().tobytes() != want
