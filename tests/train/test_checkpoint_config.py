"""Resume's config check (train/checkpoint._check_same_config): a checkpoint written before a config field
existed resumes when that field holds its default, and is refused when it does not or when a field differs."""
import pytest

from xpert_dist.config import RunConfig, load_config
from xpert_dist.errors import ConfigError
from xpert_dist.train.checkpoint import _check_same_config, _resume_relevant


def _saved_without(cfg, sec, key):
    saved = _resume_relevant(cfg)
    del saved[sec][key]  # the checkpoint predates this field
    return saved


def test_field_added_at_default_resumes(tmp_path):
    cfg = RunConfig()
    _check_same_config(tmp_path, _saved_without(cfg, "prune", "distill"), cfg)  # no error


def test_field_added_not_at_default_is_refused(tmp_path):
    cfg = load_config(None, ["prune.distill=logits"])
    saved = _saved_without(RunConfig(), "prune", "distill")
    with pytest.raises(ConfigError, match=r"prune\.distill"):
        _check_same_config(tmp_path, saved, cfg)


def test_changed_field_is_refused(tmp_path):
    saved = _resume_relevant(RunConfig())
    cfg = load_config(None, ["prune.sparsity=0.5"])
    with pytest.raises(ConfigError, match=r"prune\.sparsity"):
        _check_same_config(tmp_path, saved, cfg)


def test_removed_field_is_refused(tmp_path):
    saved = _resume_relevant(RunConfig())
    saved["train"]["grad_accum"] = 4  # a field the code no longer has
    with pytest.raises(ConfigError, match=r"train\.grad_accum"):
        _check_same_config(tmp_path, saved, RunConfig())
