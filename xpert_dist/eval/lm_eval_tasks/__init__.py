"""lm-evaluation-harness task definitions over the project's data (``xpert_pubmedqa``, ``xpert_casehold``).

Pass this folder to lm_eval: ``--include_path "$(python -c 'import xpert_dist.eval.lm_eval_tasks as t; print(t.TASK_DIR)')"``.
See docs/analysis.md ("lm-evaluation-harness").
"""
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parent
TASKS = ("xpert_pubmedqa", "xpert_casehold")
