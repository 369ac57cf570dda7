"""Dataset loading and document processing for the lm-evaluation-harness tasks in this folder.

``lm_eval --include_path xpert_dist/eval/lm_eval_tasks`` finds ``xpert_pubmedqa.yaml`` and
``xpert_casehold.yaml``; their ``custom_dataset`` / ``process_docs`` entries point here
(``!function xpert_tasks.<name>``). The data are the project's own test files (the ``pubmedqa`` and
``casehold`` aliases of ``xpert_dist.data.sources``), read from the same data root: env
``XPERT_DATA_DIR``, else ``<repo>/../shared/data``, else the sample shipped in the package. The
prompts and options are those of ``xpert_dist.eval.multiple_choice`` (``pubmedqa_items``,
``casehold_items``), so lm-eval's ``acc``/``acc_norm`` and the project's agree on the same model.

This module imports only the standard library and ``datasets`` (lm-eval's own dependency), so it
also works where ``xpert_dist`` is not importable.
"""
from __future__ import annotations

import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parents[1]  # xpert_dist/
SHARED_DATA = PACKAGE.parent.parent / "shared" / "data"
SAMPLE_DATA = PACKAGE / "data" / "samples"
DATA_DIR_ENV = "XPERT_DATA_DIR"

FILES = {"pubmedqa": "health/pubmedqa_test.jsonl", "casehold": "legal/casehold_test.jsonl"}
PUBMEDQA_OPTIONS = ["yes", "no", "maybe"]
HOLDING_MARKER = "(<HOLDING>)"


def data_root() -> Path:
    """Same precedence as ``xpert_dist.data.sources.data_root``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={env} is not a directory")
        return root
    return SHARED_DATA if SHARED_DATA.is_dir() else SAMPLE_DATA


def data_file(task: str) -> Path:
    path = data_root() / FILES[task]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (data root {data_root()}; set {DATA_DIR_ENV})")
    return path


def _load(task: str):
    import datasets

    return datasets.load_dataset("json", data_files={"test": str(data_file(task))})


def load_pubmedqa(**_kwargs):
    """DatasetDict with split ``test``: PubMedQA test records (id, question, context, answer, long_answer)."""
    return _load("pubmedqa")


def load_casehold(**_kwargs):
    """DatasetDict with split ``test``: CaseHOLD test records (id, context, endings, label)."""
    return _load("casehold")


def pubmedqa_doc(doc: dict) -> dict:
    answer = str(doc["answer"]).strip().lower()
    if answer not in PUBMEDQA_OPTIONS:
        raise ValueError(f"pubmedqa record {doc.get('id')!r}: answer {doc['answer']!r} not in {PUBMEDQA_OPTIONS}")
    return {"query": f"Abstract: {doc['context']}\nQuestion: {doc['question']}\nAnswer:",
            "choices": list(PUBMEDQA_OPTIONS), "gold": PUBMEDQA_OPTIONS.index(answer)}


def casehold_doc(doc: dict) -> dict:
    """The citing text up to ``(<HOLDING>)`` and an opening parenthesis; options are the holdings."""
    context, endings, label = doc["context"], list(doc["endings"]), int(doc["label"])
    if not 0 <= label < len(endings):
        raise ValueError(f"casehold record {doc.get('id')!r}: label {label} outside 0..{len(endings) - 1}")
    cut = context.find(HOLDING_MARKER)
    before = context[:cut] if cut >= 0 else context
    return {"query": f"{before.rstrip()} (".lstrip(), "choices": endings, "gold": label}


def process_pubmedqa(dataset):
    return dataset.map(pubmedqa_doc)


def process_casehold(dataset):
    return dataset.map(casehold_doc)
