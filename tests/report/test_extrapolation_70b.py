"""bench/rehearsal_70b/extrapolate.py: the shipped recipe's time at 70B, against hand-computed Llama-2-70B counts.

Llama-2-70B: hidden 8192, MLP 28672, 80 layers, 8 KV heads of 128, vocab 32000. Per block the seven linears hold
P_blk = 2·8192² (q, o) + 2·8192·1024 (k, v) + 3·8192·28672 (gate, up, down) = 855,638,016 weights; with the LM head
P = 80·P_blk + 32000·8192 = 68,713,185,280. A training token costs 3·(2P + 80·4·2048·8192) FLOPs (forward,
recompute, input gradient; attention QKᵀ and AV at 2048 tokens), the masked adapter's weight gradient 2·80·P_blk
more for the last third of the steps (prune.mask_final=fraction:0.667)."""
import pytest

from bench.rehearsal_70b.extrapolate import SHIPPED, SHIPPED_STE, extrapolate

P_BLK = 2 * 8192 ** 2 + 2 * 8192 * 1024 + 3 * 8192 * 28672
P = 80 * P_BLK + 32000 * 8192
FLOPS_TOK = 3 * (2 * P + 80 * 4 * 2048 * 8192)


def test_masked_phase_share_and_the_token_count_for_110():
    assert P_BLK == 855_638_016 and P == 68_713_185_280
    e = extrapolate(world=32, n_train_tokens=10 ** 9)
    assert e["training"]["flops_per_token"] == pytest.approx(FLOPS_TOK)
    share = (1 - 0.667) * 2 * 80 * P_BLK / FLOPS_TOK  # 0.1065: the masked phase alone is above 10%
    assert e["time_ratio"][SHIPPED]["masked_training_extra"] == pytest.approx(share)
    assert share > 0.10 and e["tokens_for_1.10x"][SHIPPED] is None
    ste = e["time_ratio"][SHIPPED_STE]
    assert ste["masked_training_extra"] == 0.0
    # straight-through: 1.10x once 4 in-loop steps + the final check are 10% of 2 epochs' training time
    per_tok = FLOPS_TOK / 32 / 400e12
    fixed = 4 * ste["inloop_step_s"] + ste["final_step_s"]
    assert e["tokens_for_1.10x"][SHIPPED_STE] == pytest.approx(fixed / (0.10 * per_tok * 2))
    # the ratio itself: training time plus the prune steps the schedule places in this run
    train_s = e["training"]["train_s"]
    n = len(e["training"]["inloop_prune_steps"])
    assert n == 4
    assert ste["vs_plain_lora"] == pytest.approx((train_s + n * ste["inloop_step_s"] + ste["final_step_s"]) / train_s)
    assert e["time_ratio"][SHIPPED]["vs_plain_lora"] == pytest.approx(ste["vs_plain_lora"] + share)
