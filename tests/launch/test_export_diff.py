"""launch/export_diff: the launcher commands and the two distances between exports, on hand-computed cases."""
import sys

import pytest
import torch

from xpert_dist.launch.export_diff import launcher_command, mask_disagreement, update_difference


def test_mask_disagreement_counts_entries_whose_kept_state_differs():
    ref = {"a": torch.tensor([[1.0, 0.0], [2.0, 3.0]]), "b": torch.tensor([[0.0, 5.0]])}
    got = {"a": torch.tensor([[7.0, 1.0], [0.0, 3.0]]), "b": torch.tensor([[0.0, -1.0]])}  # 2 of 6 entries flip
    assert mask_disagreement(ref, got) == pytest.approx(2 / 6)
    masks = {k: v != 0 for k, v in ref.items()}
    assert mask_disagreement(masks, {k: v != 0 for k, v in got.items()}) == pytest.approx(2 / 6)


def test_update_difference_by_hand():
    base = {"w": torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])}
    ref = {"w": torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])}  # moved by 1, 2, 0 on the kept entries
    got = {"w": torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 9.0]])}  # last row's mask differs: left out
    # rows 0-1: |got - ref|² = 0 + 4; |ref - base ⊙ M_ref|² = 1 + 4
    assert update_difference(base, ref, got) == pytest.approx((4 / 5) ** 0.5)
    with pytest.raises(ValueError, match="nothing was compensated"):
        update_difference(base, {"w": base["w"] * (ref["w"] != 0)}, got)


def test_launcher_commands():
    assert launcher_command("python", 1, ["--x"], "z.json", 1) == [sys.executable, "launchers/run.py", "--x"]
    cmd = launcher_command("torchrun", 2, ["--x"], "z.json", 123)
    assert cmd[0].endswith("torchrun") and cmd[1:] == ["--nproc_per_node", "2", "--master_port", "123",
                                                      "launchers/run.py", "--x", "--ds_config", "z.json"]
    assert launcher_command("deepspeed", 1, [], "z.json", 5)[1:3] == ["--num_gpus", "1"]
    with pytest.raises(ValueError, match="unknown launcher"):
        launcher_command("mpirun", 2, [], "z.json", 5)
