"""data.calib_sets: prune step k calibrates on draw k mod calib_sets of one seeded draw; the first draw is
the windows a run with one set uses. Oracle: calibration_batch's own windows, cut by hand."""
import json

import pytest
import torch

from xpert_dist.config import config_from_dict
from xpert_dist.data.tokenize import calibration_batch
from xpert_dist.models.loading import ByteTokenizer
from xpert_dist.train.data import build_train_data

TOK = ByteTokenizer(256)


@pytest.fixture
def corpus(tmp_path):
    texts = [f"document {i}: " + "lorem ipsum dolor sit amet " * (3 + i % 5) for i in range(40)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path), texts


def data(path, sets):
    cfg = config_from_dict({"data": {"train": path, "seq_len": 32, "calib_samples": 5, "calib_sets": sets,
                                     "seed": 3}})
    return build_train_data(cfg, TOK, None)


def test_each_step_gets_its_own_draw(corpus):
    path, texts = corpus
    one, three = data(path, 1), data(path, 3)
    ref = calibration_batch(texts, TOK, 15, 32, 3)
    assert torch.equal(one.calibration(0), ref[:5]) and torch.equal(one.calibration(4), ref[:5])
    for k in range(3):
        assert torch.equal(three.calibration(k), ref[5 * k:5 * (k + 1)])
    assert torch.equal(three.calibration(3), three.calibration(0))  # the draws repeat in order
    assert not torch.equal(three.calibration(1), three.calibration(0))
    assert torch.equal(one.input_ids, three.input_ids)  # training data unchanged

