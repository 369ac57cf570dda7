"""Rebuild the small data sample shipped in ``xpert_dist/data/samples/`` from the full domain pack.

Why: the aliases (``health``, ``legal``, ...) must work where the full pack (``../shared/data``) is absent,
e.g. an installed wheel or CI. The sample keeps the pack's layout and file names, so one resolver serves
both. Records are copied byte for byte (whole lines), never edited.

    python -m xpert_dist.data.make_samples /path/to/shared/data [out_dir]
"""
from __future__ import annotations

import sys
from pathlib import Path

# file -> (how lines are chosen, argument). "every": lines 0, k, 2k, ...; "head": the first n lines.
SAMPLE_PLAN = {
    "health/medquad_train.jsonl": ("every", 10),
    "health/pubmedqa_train.jsonl": ("head", 40),
    "health/pubmedqa_test.jsonl": ("head", 60),
    "legal/casehold_train.jsonl": ("head", 60),
    "legal/casehold_test.jsonl": ("head", 60),
    "legal/multilegalpile_eval.jsonl": ("head", 40),
    "general/wikitext2_valid.txt": ("head", 200),
    "general/wikitext2_test.txt": ("head", 200),
}
MAX_TOTAL_BYTES = 1_500_000


def make_samples(src: Path, out: Path) -> int:
    """Write every file of SAMPLE_PLAN from ``src`` to ``out``; return the total bytes written."""
    total = 0
    for rel, (how, arg) in SAMPLE_PLAN.items():
        lines = (src / rel).read_bytes().splitlines(keepends=True)
        chosen = lines[::arg] if how == "every" else lines[:arg]
        data = b"".join(chosen)
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
        total += len(data)
        print(f"{rel}: {len(chosen)} lines, {len(data)} bytes")
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"sample is {total} bytes, over the {MAX_TOTAL_BYTES} byte budget")
    return total


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    default_out = Path(__file__).resolve().parent / "samples"
    out_dir = Path(sys.argv[2]) if len(sys.argv) == 3 else default_out
    print("total bytes:", make_samples(Path(sys.argv[1]), out_dir))
