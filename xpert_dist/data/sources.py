"""Load text data the way users do, through ``datasets``: local files, local directories, hub names, aliases.

``load_records(spec)`` is the one entry point. ``spec`` is, in this order of precedence:

- an alias of the shipped domain data (table below);
- a local file, loaded by extension (``.json``/``.jsonl`` -> json, ``.txt`` -> text (one row per line,
  column ``text``), ``.parquet``, ``.csv``); a single file has one split, so ``split`` is ignored;
- a local directory (``datasets`` infers the builder and the splits from the file names);
- a hub name, ``name`` or ``name:config`` (``datasets.load_dataset``; offline this fails with a ConfigError).

Aliases read the data root: env ``XPERT_DATA_DIR``, else ``<repo>/../shared/data`` when it exists, else the
sample shipped in ``xpert_dist/data/samples/`` (same layout, fewer records). ``split`` is ignored for aliases.

=================  ==========================================================================================
alias              records
=================  ==========================================================================================
health             MedQuAD records except the held-out tail (last 10 % by position), then PubMedQA train as
                   ``Question: ...\\nContext: ...\\nAnswer: <yes/no/maybe>. <long answer>`` (column ``text``)
health_heldout     the MedQuAD held-out tail (column ``text``)
health_valid       the same MedQuAD held-out tail: the validation split defaults are chosen on
legal              CaseHOLD train except its held-out tail (last 10 % by position), the correct holding put
                   in place of ``(<HOLDING>)`` (appended in parentheses when the marker is missing) (``text``)
legal_valid        the CaseHOLD-train held-out tail as text: the validation split defaults are chosen on
legal_heldout      MultiLegalPile eval (column ``text``)
general            WikiText-2 valid, one record per article (column ``text``)
general_heldout    WikiText-2 test, one record per article (column ``text``)
pubmedqa           PubMedQA test, raw schema (question, context, answer, ...) for multiple choice
casehold           CaseHOLD test, raw schema (context, endings, label) for multiple choice
=================  ==========================================================================================
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..config import DataConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

DATA_DIR_ENV = "XPERT_DATA_DIR"
SAMPLE_DIR = Path(__file__).resolve().parent / "samples"
SHARED_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HELDOUT_FRACTION = 0.1
HOLDING_MARKER = "(<HOLDING>)"

BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}

ALIASES = {
    "health": "MedQuAD minus its held-out tail + PubMedQA train as text",
    "health_heldout": "MedQuAD held-out tail (last 10% by position)",
    "health_valid": "MedQuAD held-out tail (validation: defaults are chosen on it)",
    "legal": "CaseHOLD train minus its held-out tail, with the correct holding substituted for (<HOLDING>)",
    "legal_valid": "CaseHOLD-train held-out tail as text (validation: defaults are chosen on it)",
    "legal_heldout": "MultiLegalPile eval text",
    "general": "WikiText-2 valid, one record per article",
    "general_heldout": "WikiText-2 test, one record per article",
    "pubmedqa": "PubMedQA test (multiple choice)",
    "casehold": "CaseHOLD test (multiple choice)",
}


# ----------------------------------------------------------------------------- data root

def data_root() -> Path:
    """The folder holding ``health/``, ``legal/``, ``general/``: env, then ../shared/data, then the sample."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise ConfigError(f"{DATA_DIR_ENV}={env} is not a directory")
        return root
    if SHARED_DATA_DIR.is_dir():
        return SHARED_DATA_DIR
    return SAMPLE_DIR


def _alias_file(rel: str) -> Path:
    path = data_root() / rel
    if not path.is_file():
        raise ConfigError(f"data alias file {path} is missing (data root {data_root()}; "
                          f"set {DATA_DIR_ENV} to a folder with the domain data layout)")
    return path


# ----------------------------------------------------------------------------- loading

def load_records(spec: str, split: str = "train"):
    """A ``datasets.Dataset`` for ``spec`` (alias, local file, local directory or hub name); never empty."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"data spec {spec!r} must be a non-empty string (alias, path or hub name)")
    if spec in ALIASES:
        ds = _load_alias(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            ds = _load_file(path)
        elif path.is_dir():
            ds = _call_load_dataset(spec, f"directory {path}", str(path), split=split)
        elif _looks_local(spec):
            raise ConfigError(f"data file {path} does not exist")
        else:
            name, _, config = spec.partition(":")
            args = (name, config) if config else (name,)
            ds = _call_load_dataset(spec, f"hub dataset {spec!r}", *args, split=split)
    if len(ds) == 0:
        raise ConfigError(f"dataset {spec!r} is empty (0 records)")
    return ds


def _looks_local(spec: str) -> bool:
    return (Path(spec).suffix.lower() in BUILDERS or spec.startswith(("/", "./", "../", "~"))
            or os.sep in spec and Path(spec.split(os.sep)[0]).exists())


def _load_file(path: Path):
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ConfigError(f"data file {path}: unknown extension {path.suffix!r}; "
                          f"known: {', '.join(sorted(BUILDERS))}")
    if path.stat().st_size == 0:
        raise ConfigError(f"data file {path} is empty")
    return _call_load_dataset(str(path), f"file {path}", builder, data_files=str(path), split="train")


def _call_load_dataset(spec: str, what: str, *args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetGenerationError, ValueError...)
        raise ConfigError(f"data {what} could not be loaded (spec {spec!r}): "
                          f"{type(e).__name__}: {str(e)[:500]}") from e


# ----------------------------------------------------------------------------- aliases

def heldout_split(n: int) -> int:
    """Number of records kept for training when the last HELDOUT_FRACTION (at least one) is held out."""
    return n - max(1, int(n * HELDOUT_FRACTION)) if n > 1 else n


def pubmedqa_as_text(row: dict) -> str:
    return (f"Question: {row['question']}\nContext: {row['context']}\n"
            f"Answer: {row['answer']}. {row.get('long_answer') or ''}").rstrip()


def casehold_as_text(row: dict) -> str:
    """The CaseHOLD context with its correct holding in place of the ``(<HOLDING>)`` marker."""
    holding = f"({row['endings'][int(row['label'])]})"
    context = row["context"]
    if HOLDING_MARKER in context:
        return context.replace(HOLDING_MARKER, holding, 1)
    return f"{context.rstrip()} {holding}"


_WIKI_TITLE = re.compile(r" = [^=](.*[^=])? = ")


def wikitext_articles(lines: list[str]) -> list[str]:
    """Group WikiText lines into articles; an article starts at a top-level `` = Title = `` line."""
    articles: list[list[str]] = []
    for line in lines:
        line = line.rstrip("\n")
        if _WIKI_TITLE.fullmatch(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    texts = ["\n".join(a).strip() for a in articles]
    return [t for t in texts if t]


def _text_dataset(texts: list[str], ids: list[str] | None = None):
    from datasets import Dataset

    ids = ids if ids is not None else [str(i) for i in range(len(texts))]
    return Dataset.from_dict({"id": list(ids), "text": list(texts)})


def _load_alias(name: str):
    if name == "pubmedqa":
        return load_records(str(_alias_file("health/pubmedqa_test.jsonl")))
    if name == "casehold":
        return load_records(str(_alias_file("legal/casehold_test.jsonl")))
    if name == "legal_heldout":
        return load_records(str(_alias_file("legal/multilegalpile_eval.jsonl")))
    if name in ("health", "health_heldout", "health_valid"):
        med = load_records(str(_alias_file("health/medquad_train.jsonl")))
        cut = heldout_split(len(med))
        if name in ("health_heldout", "health_valid"):
            return med.select(range(cut, len(med)))
        pub = load_records(str(_alias_file("health/pubmedqa_train.jsonl")))
        texts = list(med["text"][:cut]) + [pubmedqa_as_text(r) for r in pub]
        ids = list(med["id"][:cut]) + [f"pubmedqa/{i}" for i in pub["id"]]
        return _text_dataset(texts, ids)
    if name in ("legal", "legal_valid"):
        train = load_records(str(_alias_file("legal/casehold_train.jsonl")))
        cut = heldout_split(len(train))
        part = train.select(range(cut) if name == "legal" else range(cut, len(train)))
        return _text_dataset([casehold_as_text(r) for r in part], list(part["id"]))
    if name in ("general", "general_heldout"):
        rel = "general/wikitext2_valid.txt" if name == "general" else "general/wikitext2_test.txt"
        lines = load_records(str(_alias_file(rel)))["text"]
        return _text_dataset(wikitext_articles(lines))
    raise ConfigError(f"unknown data alias {name!r}; known: {', '.join(ALIASES)}")  # pragma: no cover


# ----------------------------------------------------------------------------- field access

def detect_format(ds, cfg: DataConfig) -> str:
    """``text`` or ``prompt_completion``: cfg.format, or (auto) whether both prompt/completion fields exist."""
    cols = set(ds.column_names)
    has_pc = cfg.prompt_field in cols and cfg.completion_field in cols
    if cfg.format == "prompt_completion" and not has_pc:
        raise ConfigError(f"data.format=prompt_completion but the dataset lacks field "
                          f"{cfg.prompt_field!r} or {cfg.completion_field!r}; columns: {sorted(cols)}")
    if cfg.format != "auto":
        return cfg.format
    return "prompt_completion" if has_pc else "text"


def texts_of(ds, cfg: DataConfig, limit: int | None = None) -> list[str]:
    """Plain texts: field cfg.text_field, else ``text`` (.txt files), else prompt + completion joined.

    Empty or whitespace-only texts are dropped (WikiText has blank lines); ``limit`` keeps the first n.
    """
    cols = ds.column_names
    if cfg.text_field in cols:
        raw = ds[cfg.text_field]
    elif "text" in cols:
        raw = ds["text"]
    elif cfg.prompt_field in cols and cfg.completion_field in cols:
        raw = [(p or "") + (c or "") for p, c in zip(ds[cfg.prompt_field], ds[cfg.completion_field])]
    else:
        raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column of the dataset; "
                          f"columns: {sorted(cols)}")
    bad = next((t for t in raw if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"data.text_field={cfg.text_field!r} holds {type(bad).__name__} values, not strings")
    texts = [t for t in raw if t and t.strip()]
    if not texts:
        raise ConfigError(f"data field {cfg.text_field!r} has no non-empty text")
    return texts[:limit] if limit is not None else texts


def prompt_completion_pairs(ds, cfg: DataConfig, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, completion) pairs from cfg.prompt_field / cfg.completion_field; rows missing either are skipped."""
    cols = ds.column_names
    for name, field in (("prompt_field", cfg.prompt_field), ("completion_field", cfg.completion_field)):
        if field not in cols:
            raise ConfigError(f"data.{name}={field!r} is not a column of the dataset; columns: {sorted(cols)}")
    pairs = [(p, c) for p, c in zip(ds[cfg.prompt_field], ds[cfg.completion_field])
             if isinstance(p, str) and isinstance(c, str) and c]
    if not pairs:
        raise ConfigError(f"data fields {cfg.prompt_field!r}/{cfg.completion_field!r} hold no usable pairs")
    return pairs[:limit] if limit is not None else pairs
