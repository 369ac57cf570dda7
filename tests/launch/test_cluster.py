"""Cluster settings (kept out of RunConfig), sweep/repro planning, and submit.py's dry run."""
from __future__ import annotations

import subprocess
import sys

import pytest

from xpert_dist.errors import ConfigError
from xpert_dist.launch import cluster, submission

from .conftest import REPO, tiny_config, write_config


def test_settings_from_yaml_and_flags(tmp_path):
    cfg = write_config(tmp_path / "run.json", tiny_config(tmp_path / "out"))
    (tmp_path / "run.slurm.yaml").write_text(
        "slurm:\n  partition: gpu\n  nodes: 4\n  tasks_per_node: 8\n  gpus_per_node: 8\n"
        "  cpus_per_task: 12\n  mem: 480G\n  time: '1-12:00:00'\n  qos: high\n  setup: ['module load cuda']\n")
    s = cluster.load_settings(None, cfg, {"nodes": 2, "time": "90", "partition": None})
    assert (s.partition, s.nodes, s.tasks_per_node, s.gpus_per_node, s.cpus_per_task) == ("gpu", 2, 8, 8, 12)
    assert s.mem_gb == 480 and s.timeout_min == 90 and s.world_size == 16
    p = cluster.executor_parameters(s, "slurm")
    assert p["slurm_partition"] == "gpu" and p["gpus_per_node"] == 8 and p["slurm_qos"] == "high"
    assert p["slurm_signal_delay_s"] == 300 and p["slurm_setup"] == ["module load cuda"]
    assert cluster.parse_time_min("1-12:00:00") == 2160 and cluster.parse_time_min("00:30:01") == 31
    assert cluster.parse_mem_gb("512M") == 0.5


def test_settings_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="slurm.gpus"):
        cluster.settings_from_dict({"slurm": {"gpus": 8}})
    with pytest.raises(ConfigError, match="slurm.nodes"):
        cluster.settings_from_dict({"nodes": 0})
    with pytest.raises(ConfigError, match="local executor"):
        cluster.executor_parameters(cluster.SlurmSettings(nodes=2), "local")


def test_grid_expansion_and_labels():
    grid = submission.parse_grid(["prune.sparsity=0.3,0.5", "train.seed=0,1,2", "lora.target_modules=[q_proj,v_proj],[o_proj]"])
    points = submission.expand_grid(grid)
    assert len(points) == 12
    assert points[0] == [("prune.sparsity", "0.3"), ("train.seed", "0"), ("lora.target_modules", "[q_proj,v_proj]")]
    assert submission.grid_label(points[0]) == "prune.sparsity-0.3_train.seed-0_lora.target_modules-q_proj-v_proj"
    with pytest.raises(ConfigError):
        submission.parse_grid(["prune.sparsity"])


def test_plan_sweep_and_repro(tmp_path):
    cfg = write_config(tmp_path / "run.json", tiny_config(tmp_path / "out"))
    s = cluster.SlurmSettings(tasks_per_node=2)
    plans = submission.plan_sweep(str(cfg), ["train.max_steps=4"], ["prune.sparsity=0.3,0.5", "train.seed=0,1"], s)
    assert len(plans) == 4
    dirs = {p.output_dir for p in plans}
    assert str(tmp_path / "out" / "prune.sparsity-0.5_train.seed-1") in dirs
    p = next(p for p in plans if p.label == "prune.sparsity-0.5_train.seed-1")
    assert p.config["prune"]["sparsity"] == 0.5 and p.config["train"]["seed"] == 1
    assert p.config["train"]["max_steps"] == 4
    with pytest.raises(ConfigError, match="prune.sparsity"):  # validated before submission
        submission.plan_sweep(str(cfg), [], ["prune.sparsity=0.5,1.5"], s)
    rp = submission.plan_repro(str(cfg), ["train.batch_size=4"], [1, "1x2", "2x1"], s, repeats=1)
    assert [(r.label, r.world_size, r.settings.nodes) for r in rp] == [
        ("1x1", 1, 1), ("1x2", 2, 1), ("2x1", 2, 2), ("1x1-rerun1", 1, 1)]
    assert rp[1].output_dir == str(tmp_path / "out" / "repro" / "1x2")
    # batch_size is the global batch: nothing is rescaled for the world size
    assert [r.config["train"]["batch_size"] for r in rp] == [4, 4, 4, 4]
    with pytest.raises(ConfigError, match="cannot be split evenly over 3 ranks"):
        submission.plan_repro(str(cfg), ["train.batch_size=4"], ["1x3"], s)
    big = submission.layout_for_world_size(cluster.SlurmSettings(tasks_per_node=8, gpus_per_node=8), 32)
    assert (big.nodes, big.tasks_per_node, big.gpus_per_node) == (4, 8, 8)


def test_submit_cli_dry_run(tmp_path):
    cfg = write_config(tmp_path / "run.json", tiny_config(tmp_path / "out"))
    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), "sweep", "--config", str(cfg),
                           "--nodes", "1", "--grid", "prune.sparsity=0.3,0.5", "train.seed=0,1",
                           "--tasks-per-node", "2", "--time", "30", "--dry-run", "train.max_steps=4"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "4 job(s), executor slurm" in proc.stdout and "1 node(s) x 2 task(s), 30 min" in proc.stdout
    bad = subprocess.run([sys.executable, str(REPO / "launchers" / "submit.py"), "run", "--config", str(cfg),
                          "--dry-run", "prune.method=nope"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert bad.returncode == 2 and "prune.method" in bad.stderr


def test_sweep_goes_out_as_one_array_per_layout(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "run.json", tiny_config(tmp_path / "out"))
    submitted = []

    class FakeJob:
        def __init__(self, n):
            self.job_id = f"7_{n}"
            self.paths = type("P", (), {"stdout": "o", "stderr": "e"})()

    class FakeExecutor:
        def __init__(self, settings):
            self.settings, self.batches = settings, 0

        def batch(self):
            import contextlib
            self.batches += 1
            return contextlib.nullcontext()

        def submit(self, fn):
            submitted.append((self, fn))
            return FakeJob(len(submitted) - 1)

    monkeypatch.setattr(submission, "make_executor", lambda s, ex, folder: FakeExecutor(s))
    plans = submission.plan_sweep(str(cfg), [], ["prune.sparsity=0.3,0.5", "train.seed=0,1"],
                                  cluster.SlurmSettings(setup=["module load x"]))
    jobs = submission.submit_plans(plans, "slurm", as_array=True)
    assert [j.job_id for j in jobs] == ["7_0", "7_1", "7_2", "7_3"]
    assert len({id(ex) for ex, _ in submitted}) == 1  # one executor, one batch = one array
    assert [fn.config["output_dir"] for _, fn in submitted] == [p.output_dir for p in plans]


def test_unquoted_time_in_settings_file_is_a_duration(tmp_path):
    """YAML 1.1 reads an unquoted 1:30:00 as the base-60 number 5400; the settings file must not."""
    from xpert_dist.launch.cluster import load_settings

    f = tmp_path / "slurm.yaml"
    f.write_text("slurm:\n  time: 1:30:00\n")
    assert load_settings(f).timeout_min == 90
