"""The command line as a new user types it (``launchers/run.py``, ``launchers/submit.py sweep``):
``N:M`` values, options after overrides, a model folder that holds no model, bitsandbytes noise.

One tiny real run (random 2-block Llama, 4 steps, 2:4 Wanda) is shared by the tests that read its
outputs; the other cases stop at validation or at model loading.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[2]
TRAIN_DATA = "/work/shared/data/health/medquad_train.jsonl"
BNB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward"


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore::FutureWarning", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO)}


def _cli(args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def tiny_config(tmp_path: Path, out: Path) -> Path:
    cfg = {"name": "cli", "output_dir": str(out), "model": {"tiny": {}}, "lora": {"dropout": 0.0},
           "data": {"train": TRAIN_DATA, "seq_len": 32, "max_train_samples": 24, "calib_samples": 4},
           "train": {"max_steps": 4, "batch_size": 2, "lr": 1e-3},
           "prune": {"method": "wanda", "schedule": "steps", "prune_every": 2},
           "eval": {"perplexity_windows": 1, "perplexity_seq_len": 32, "tasks": []}}
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory):
    """``run.py --config C prune.pattern=2:4 prune.sparsity=0.5 output_dir=D --no-progress`` (option last)."""
    tmp = tmp_path_factory.mktemp("cli")
    out = tmp / "run"
    proc = _cli(["launchers/run.py", "--config", str(tiny_config(tmp, tmp / "unused")),
                 "prune.pattern=2:4", "prune.sparsity=0.5", f"output_dir={out}", "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out, proc


def test_nm_pattern_and_trailing_option_on_the_command_line(nm_run):
    out, proc = nm_run
    man = json.loads((out / "manifest.json").read_text())
    assert man["config"]["prune"]["pattern"] == "2:4"  # a string, not YAML 1.1's 2*60+4 = 124
    assert man["config"]["output_dir"] == str(out)      # the override before --no-progress was kept
    assert "train:" not in proc.stderr                  # --no-progress took effect (no tqdm bar)
    from xpert_dist.train.export import load_masks

    masks = load_masks(out / "masks.safetensors")
    assert len(masks) == 14
    for name, keep in masks.items():  # every group of 4 consecutive inputs keeps exactly 2
        groups = keep.reshape(keep.shape[0], -1, 4).sum(-1)
        assert torch.equal(groups, torch.full_like(groups, 2)), name


def test_tiny_run_prints_no_bitsandbytes_kernel_warning(nm_run):
    _, proc = nm_run
    assert BNB_KERNEL_WARNING not in proc.stderr and "pip install kernels" not in proc.stderr


def test_bitsandbytes_kernel_warning_is_filtered_only(tmp_path):
    """The filter drops that one bitsandbytes message (emitted the way bitsandbytes does on AVX512-BF16
    CPUs) and nothing else from the same logger."""
    code = ("import logging, sys; logging.basicConfig(stream=sys.stderr)\n"
            "import xpert_dist.models.loading\n"
            "from xpert_dist.models import BNB_KERNEL_LOGGER\n"
            "lg = logging.getLogger(BNB_KERNEL_LOGGER)\n"
            "lg.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you "
            "already `pip install kernels` and the kernels >= 0.11.1', 'ImportError')\n"
            "lg.warning('another bitsandbytes warning')\n")
    proc = _cli(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert BNB_KERNEL_WARNING not in proc.stderr and "pip install kernels" not in proc.stderr
    assert "another bitsandbytes warning" in proc.stderr


def test_nm_pattern_in_a_sweep(tmp_path):
    cfg = tiny_config(tmp_path, tmp_path / "sweep")
    proc = _cli(["launchers/submit.py", "sweep", "--config", str(cfg), "--executor", "local", "--dry-run",
                 "prune.sparsity=0.5", "--grid", "prune.pattern=2:4,4:8"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 job(s)" in proc.stdout
    assert "prune.pattern-2-4" in proc.stdout and "prune.pattern-4-8" in proc.stdout

    from xpert_dist.launch.cluster import SlurmSettings
    from xpert_dist.launch.submission import plan_sweep

    plans = plan_sweep(str(cfg), ["prune.sparsity=0.5"], ["prune.pattern=2:4,4:8"], SlurmSettings())
    assert [p.config["prune"]["pattern"] for p in plans] == ["2:4", "4:8"]


def test_override_values_are_yaml_without_base_60():
    from xpert_dist.config import load_config, parse_overrides

    assert parse_overrides(["prune.pattern=2:4", "a=4:8", "b=1:30:00", "c=1e5", "d=2e-4", "e=12", "f=0.5"]) == {
        "prune": {"pattern": "2:4"}, "a": "4:8", "b": "1:30:00", "c": 1e5, "d": 2e-4, "e": 12, "f": 0.5}
    cfg = load_config(None, ["prune.pattern=4:8", "prune.sparsity=0.5", "prune.method=wanda"])
    assert cfg.prune.pattern == "4:8"


def test_nm_pattern_in_a_config_file(tmp_path):
    from xpert_dist.config import load_config

    (tmp_path / "c.yaml").write_text("prune:\n  pattern: 2:4\n  sparsity: 0.5\n")
    assert load_config(tmp_path / "c.yaml").prune.pattern == "2:4"


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("xpert-dist: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_model_folder_without_a_model_exit_2_one_line(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one short record for the data check"}) + "\n")
    proc = _cli(["launchers/run.py", f"model.name_or_path={empty}", f"data.train={tmp_path / 'd.jsonl'}",
                 f"output_dir={tmp_path / 'out'}", "--no-progress"], timeout=200)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert str(empty) in line and "holds no model" in line


def test_model_folder_with_config_but_no_weights_is_a_config_error(tmp_path):
    """transformers' own errors (no weights; a config.json that is not JSON) become one ConfigError
    naming the path."""
    from xpert_dist.config import ModelConfig
    from xpert_dist.errors import ConfigError
    from xpert_dist.models.loading import load_model, tiny_llama_config

    no_weights = tmp_path / "no_weights"
    tiny_llama_config().save_pretrained(no_weights)
    with pytest.raises(ConfigError, match=r"no_weights.*could not be loaded") as e:
        load_model(ModelConfig(name_or_path=str(no_weights)))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad_config"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad_config.*could not be loaded") as e:
        load_model(ModelConfig(name_or_path=str(bad)))
    assert "\n" not in str(e.value)
