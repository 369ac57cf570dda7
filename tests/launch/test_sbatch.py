"""Layouts of xpert_dist.launch.sbatch (the submission itself runs in test_multinode.py)."""
from __future__ import annotations

import pytest

from xpert_dist.errors import ConfigError
from xpert_dist.launch import sbatch


@pytest.mark.parametrize("spec, nodes, tpn, part, label", [
    ("1", 1, 1, "debug", "1"), ("1x2", 1, 2, "debug", "1x2"), ("2x1", 2, 1, "multi", "2x1"),
    ("2X2", 2, 2, "multi", "2x2"), ("4", 1, 4, "debug", "1x4")])
def test_layouts(spec, nodes, tpn, part, label):
    lay = sbatch.parse_layout(spec)
    assert (lay.nodes, lay.tasks_per_node, lay.partition, lay.label) == (nodes, tpn, part, label)
    assert lay.world_size == nodes * tpn
    assert lay.sbatch_options() == [f"--partition={part}", f"--nodes={nodes}", f"--ntasks-per-node={tpn}"]
    assert sbatch.parse_layout(spec, partition="gpu").partition == "gpu"


@pytest.mark.parametrize("bad", ["", "2x", "x2", "0x1", "1x0", "two"])
def test_bad_layout_names_it(bad):
    with pytest.raises(ConfigError, match="layout"):
        sbatch.parse_layout(bad)
