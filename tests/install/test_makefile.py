"""The Makefile's targets name scripts that exist (``make bench`` once called a missing ``bench/run_all.py``)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _recipes() -> dict[str, list[str]]:
    targets: dict[str, list[str]] = {}
    current = None
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z_$()./-]+):", line)
        if m and not line.startswith("\t"):
            current = m.group(1)
            targets[current] = []
        elif line.startswith("\t") and current is not None:
            targets[current].append(line.strip())
    return targets


def test_every_python_script_a_target_runs_exists():
    recipes = _recipes()
    assert {"setup", "run", "test", "bench"} <= set(recipes), sorted(recipes)
    scripts = [(t, s) for t, lines in recipes.items() for line in lines
               for s in re.findall(r"python\s+((?:\S+/)*\S+\.py)", line)]
    assert any(t == "bench" for t, _ in scripts), "make bench runs no script"
    missing = [(t, s) for t, s in scripts if not (ROOT / s).is_file()]
    assert not missing, missing


def test_bench_target_is_the_method_table_entry_point():
    bench = " ".join(_recipes()["bench"])
    assert "bench/method_table/run.py" in bench, bench
