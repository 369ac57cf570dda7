"""The installed package works outside the repository (the console script and a plain import), as a
user who ran `pip install -e .` or `make setup` and then changed directory would use it."""
import os
import subprocess
import sys


def test_import_and_console_script_outside_the_repo(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    imp = subprocess.run([sys.executable, "-c", "import xpert_dist.cli, xpert_dist.train.pipeline; print('ok')"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert imp.returncode == 0 and imp.stdout.strip() == "ok", imp.stderr[-2000:]
    script = os.path.join(os.path.dirname(sys.executable), "xpert-dist")
    cli = subprocess.run([script, "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "xpert-dist run --config" in cli.stdout
