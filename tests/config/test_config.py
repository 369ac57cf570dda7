"""The configuration object: YAML/JSON, command-line overrides, and one validation with clear errors."""
import json

import pytest

from xpert_dist.config import RunConfig, load_config, parse_overrides
from xpert_dist.errors import ConfigError


def test_yaml_json_and_overrides_agree(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("prune:\n  sparsity: 0.3\n  method: wanda\ntrain: {max_steps: 7}\n")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"prune": {"sparsity": 0.3, "method": "wanda"}, "train": {"max_steps": 7}}))
    a, b = load_config(y), load_config(j)
    assert a == b
    assert a.prune.sparsity == 0.3 and a.prune.method == "wanda" and a.train.max_steps == 7
    c = load_config(y, ["prune.sparsity=0.5", "lora.target_modules=[q_proj,v_proj]", "name=x"])
    assert c.prune.sparsity == 0.5 and c.lora.target_modules == ["q_proj", "v_proj"] and c.name == "x"
    assert c.prune.method == "wanda"  # untouched keys survive
    assert load_config() == RunConfig()


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "d=[1,2]"]) == {"a": {"b": 1, "c": "x"}, "d": [1, 2]}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


@pytest.mark.parametrize("override, field", [
    ("prune.sparsity=1.0", "prune.sparsity"),
    ("prune.sparsity=-0.1", "prune.sparsity"),
    ("prune.method=obs", "prune.method"),
    ("prune.group=row", "prune.group"),
    ("prune.variant=fast", "prune.variant"),
    ("prune.pattern=3:2", "prune.pattern"),
    ("prune.pattern=2:4", "prune.pattern"),  # 2:4 means 50%, default sparsity is 0.4
    ("prune.modules=[q_proj,qkv_proj]", "prune.modules"),
    ("lora.target_modules=[c_attn]", "lora.target_modules"),
    ("prune.schedule=steps", "prune.prune_every"),
    ("prune.prune_steps=-1", "prune.prune_steps"),
    ("train.batch_size=0", "train.batch_size"),
    ("eval.tasks=[mmlu]", "eval.tasks"),
    ("ds_config=/nonexistent/zero3.json", "ds_config"),
    ("prune.bogus=1", "prune.bogus"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid"):
        load_config(bad)


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name


def test_yaml_off_means_off(tmp_path):
    """YAML 1.1 reads a bare `off` as False; string settings keep meaning 'off'."""
    y = tmp_path / "c.yaml"
    y.write_text("prune: {pbs: off}\n")
    assert load_config(y).prune.pbs == "off"
    assert load_config(None, ["prune.pbs=off"]).prune.pbs == "off"
    with pytest.raises(ConfigError, match="prune.pbs"):
        load_config(None, ["prune.pbs=on"])
