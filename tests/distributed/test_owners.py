"""Owner assignment: every key exactly once, deterministic, and balanced within the stated bound."""
import itertools
import random

import pytest

from xpert_dist.distributed.owners import assign_owners, balance_bound, loads
from xpert_dist.errors import ConfigError


def test_covers_every_key_once_and_is_deterministic():
    sizes = {f"{i}.{g}": (i * 7919 + len(g)) % 97 + 1 for i in range(6) for g in ("attn_in", "o_in", "mlp_in")}
    for w in (1, 2, 3, 5, 8, 64):
        a = assign_owners(sizes, w)
        assert set(a) == set(sizes) and all(0 <= r < w for r in a.values())
        shuffled = dict(random.Random(w).sample(list(sizes.items()), len(sizes)))
        assert assign_owners(shuffled, w) == a  # independent of dict order


def test_tie_break_by_key_then_rank():
    assert assign_owners({"b": 4, "a": 4, "c": 4, "d": 1}, 3) == {"a": 0, "b": 1, "c": 2, "d": 0}


def test_llama70b_block_full_hessians():
    h, i = 8192, 28672
    sizes = {"attn_in": h * h * 4, "o_in": h * h * 4, "mlp_in": h * h * 4, "down_in": i * i * 4}
    for w in (2, 4, 8, 16):
        a = assign_owners(sizes, w)
        assert max(loads(a, sizes, w)) == sizes["down_in"]  # the largest item alone: optimal
        assert len({a["attn_in"], a["o_in"], a["mlp_in"], a["down_in"]}) == min(4, w)


def _opt(sizes, w):
    best = float("inf")
    items = list(sizes.values())
    for combo in itertools.product(range(w), repeat=len(items)):
        ld = [0] * w
        for s, r in zip(items, combo):
            ld[r] += s
        best = min(best, max(ld))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_balance_bound(seed):
    rng = random.Random(seed)
    w = rng.randint(1, 6)
    n = rng.randint(1, 30)
    sizes = {f"k{j}": rng.choice([rng.randint(1, 10), rng.randint(1, 10_000)]) for j in range(n)}
    a = assign_owners(sizes, w)
    mx = max(loads(a, sizes, w))
    mean = sum(sizes.values()) / w
    eps = (w - 1) / (w + 1)
    assert mx <= max(max(sizes.values()), mean * (1 + eps)) + 1e-9
    assert mx <= balance_bound(sizes, w) + 1e-9
    if n <= 7 and w <= 3:  # Graham: LPT ≤ (4/3 − 1/(3W))·OPT
        assert mx <= (4 / 3 - 1 / (3 * w)) * _opt(sizes, w) + 1e-9


def test_bound_is_tight_example():
    # 4 equal items on 3 ranks: max load 2 = mean·(1 + ε_3) with mean 4/3, ε_3 = 1/2
    a = assign_owners({"a": 1, "b": 1, "c": 1, "d": 1}, 3)
    assert max(loads(a, {"a": 1, "b": 1, "c": 1, "d": 1}, 3)) == 2 == balance_bound({"a": 1, "b": 1, "c": 1, "d": 1}, 3)


def test_bad_input():
    with pytest.raises(ConfigError, match="world_size"):
        assign_owners({"a": 1}, 0)
    with pytest.raises(ConfigError, match="'a'"):
        assign_owners({"a": -1}, 2)
