"""load_records / aliases / field access, checked against the raw files read with the json module."""
import json
from pathlib import Path

import pytest

from xpert_dist.config import DataConfig
from xpert_dist.data import sources
from xpert_dist.data.sources import (SAMPLE_DIR, SHARED_DATA_DIR, data_root, detect_format, load_records,
                                     prompt_completion_pairs, texts_of)
from xpert_dist.errors import ConfigError

needs_shared = pytest.mark.skipif(not SHARED_DATA_DIR.is_dir(), reason="../shared/data not present")


def raw_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def sample_root(monkeypatch):
    monkeypatch.setenv("XPERT_DATA_DIR", str(SAMPLE_DIR))
    return SAMPLE_DIR


# ----------------------------------------------------------------------------- aliases

def check_aliases(root: Path):
    med = raw_jsonl(root / "health/medquad_train.jsonl")
    pub_train = raw_jsonl(root / "health/pubmedqa_train.jsonl")
    n_held = max(1, len(med) // 10)
    cut = len(med) - n_held

    health = load_records("health")
    assert len(health) == cut + len(pub_train)
    assert health["text"][:cut] == [r["text"] for r in med[:cut]]
    last = pub_train[-1]
    assert health["text"][-1].startswith(f"Question: {last['question']}\nContext: {last['context']}\n"
                                         f"Answer: {last['answer']}.")

    held = load_records("health_heldout")
    assert held["id"] == [r["id"] for r in med[cut:]]
    assert not set(held["id"]) & set(health["id"])

    assert load_records("health_valid")["id"] == held["id"]

    cases = raw_jsonl(root / "legal/casehold_train.jsonl")
    legal_cut = len(cases) - max(1, len(cases) // 10)
    legal, legal_valid = load_records("legal"), load_records("legal_valid")
    assert legal["id"] == [r["id"] for r in cases[:legal_cut]]
    assert legal_valid["id"] == [r["id"] for r in cases[legal_cut:]]
    for rec, text in zip(cases, list(legal["text"]) + list(legal_valid["text"])):
        holding = rec["endings"][rec["label"]]
        assert "<HOLDING>" not in text and f"({holding})" in text
        if "(<HOLDING>)" in rec["context"]:
            assert text == rec["context"].replace("(<HOLDING>)", f"({holding})")
        else:
            assert text == rec["context"].rstrip() + f" ({holding})"

    mlp = raw_jsonl(root / "legal/multilegalpile_eval.jsonl")
    assert load_records("legal_heldout")["text"] == [r["text"] for r in mlp]
    assert load_records("pubmedqa")["id"] == [r["id"] for r in raw_jsonl(root / "health/pubmedqa_test.jsonl")]
    assert load_records("casehold")["label"] == [r["label"] for r in raw_jsonl(root / "legal/casehold_test.jsonl")]

    for alias, name in (("general", "valid"), ("general_heldout", "test")):
        lines = (root / f"general/wikitext2_{name}.txt").read_text(encoding="utf-8").splitlines()
        titles = [ln for ln in lines if ln.startswith(" = ") and ln.endswith(" = ") and not ln.startswith(" = = ")]
        articles = load_records(alias)["text"]
        assert len(articles) == len(titles)
        assert [a.splitlines()[0].strip() for a in articles] == [t.strip() for t in titles]
        words = sum(len(ln.split()) for ln in lines)
        assert sum(len(a.split()) for a in articles) == words  # nothing lost or added


@needs_shared
def test_aliases_resolve_to_shared_data(monkeypatch):
    monkeypatch.delenv("XPERT_DATA_DIR", raising=False)
    assert data_root() == SHARED_DATA_DIR
    check_aliases(SHARED_DATA_DIR)
    assert len(load_records("health_heldout")) == 193 and len(load_records("casehold")) == 200


def test_aliases_resolve_to_package_sample(sample_root):
    assert data_root() == SAMPLE_DIR
    check_aliases(SAMPLE_DIR)
    assert len(load_records("pubmedqa")) == 60


def test_sample_used_when_shared_data_absent(monkeypatch, tmp_path):
    monkeypatch.delenv("XPERT_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "SHARED_DATA_DIR", tmp_path / "nowhere")
    assert data_root() == SAMPLE_DIR


def test_bad_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XPERT_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="XPERT_DATA_DIR"):
        load_records("health")
    monkeypatch.setenv("XPERT_DATA_DIR", str(tmp_path))  # exists but lacks the layout
    with pytest.raises(ConfigError, match="medquad_train.jsonl"):
        load_records("health")


@needs_shared
def test_sample_is_small_and_byte_exact_subset():
    files = [p for p in SAMPLE_DIR.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".txt")]
    assert len(files) == 8 and sum(p.stat().st_size for p in files) < 1_500_000
    assert (SAMPLE_DIR / "README.md").is_file()
    for p in files:
        full = set((SHARED_DATA_DIR / p.relative_to(SAMPLE_DIR)).read_bytes().splitlines())
        assert set(p.read_bytes().splitlines()) <= full, p


# ----------------------------------------------------------------------------- local files

def test_local_file_formats(tmp_path):
    rows = [{"text": "alpha beta", "n": 1}, {"text": "gamma", "n": 2}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    (tmp_path / "c.txt").write_text("alpha beta\n\ngamma\n")
    (tmp_path / "d.csv").write_text("text,n\nalpha beta,1\ngamma,2\n")
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(tmp_path / "e.parquet"))
    cfg = DataConfig()
    for name in ("a.jsonl", "b.json", "c.txt", "d.csv", "e.parquet"):
        ds = load_records(str(tmp_path / name))
        assert texts_of(ds, cfg) == ["alpha beta", "gamma"], name
    assert len(load_records(str(tmp_path / "c.txt"))) == 3  # the blank line is a record, texts_of drops it


def test_local_directory(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "x y"}) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "z"}) + "\n" + json.dumps({"text": "w"}) + "\n")
    assert load_records(str(tmp_path))["text"] == ["x y"]
    assert load_records(str(tmp_path), split="test")["text"] == ["z", "w"]
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_records(str(tmp_path), split="validation")


def test_missing_empty_and_unknown_files(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist") as e:
        load_records(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        load_records("./definitely/not/here")
    for name in ("empty.jsonl", "empty.txt", "empty.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(ConfigError, match="empty"):
            load_records(str(tmp_path / name))
    (tmp_path / "rows.json").write_text("[]")
    with pytest.raises(ConfigError, match="empty|could not be loaded"):
        load_records(str(tmp_path / "rows.json"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ConfigError, match="unknown extension"):
        load_records(str(tmp_path / "x.xml"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="could not be loaded"):
        load_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ConfigError):
        load_records("")


def test_hub_name_offline_is_a_config_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="hub dataset 'someorg/some_data' could not be loaded"):
        load_records("someorg/some_data")


# ----------------------------------------------------------------------------- fields and formats

def test_fields_and_format_detection(tmp_path):
    from datasets import Dataset

    pc = Dataset.from_dict({"prompt": ["Q1 ", "Q2 ", None], "completion": ["A1", "A2", "A3"]})
    assert detect_format(pc, DataConfig()) == "prompt_completion"
    assert prompt_completion_pairs(pc, DataConfig()) == [("Q1 ", "A1"), ("Q2 ", "A2")]
    assert texts_of(pc, DataConfig()) == ["Q1 A1", "Q2 A2", "A3"]
    assert detect_format(pc, DataConfig(format="text")) == "text"

    custom = Dataset.from_dict({"q": ["a"], "a": ["b"], "body": ["  ", "doc"][1:]})
    cfg = DataConfig(prompt_field="q", completion_field="a", text_field="body")
    assert detect_format(custom, cfg) == "prompt_completion"
    assert texts_of(custom, cfg) == ["doc"]

    plain = Dataset.from_dict({"text": ["one", " ", "", "two"]})
    assert detect_format(plain, DataConfig()) == "text"
    assert texts_of(plain, DataConfig(text_field="body")) == ["one", "two"]  # .txt column fallback
    assert texts_of(plain, DataConfig(), limit=1) == ["one"]
    with pytest.raises(ConfigError, match="prompt_completion"):
        detect_format(plain, DataConfig(format="prompt_completion"))
    with pytest.raises(ConfigError, match="data.prompt_field='prompt'"):
        prompt_completion_pairs(plain, DataConfig())
    with pytest.raises(ConfigError, match="data.text_field='body'.*columns"):
        texts_of(Dataset.from_dict({"other": ["x"]}), DataConfig(text_field="body"))
    with pytest.raises(ConfigError, match="no non-empty text"):
        texts_of(Dataset.from_dict({"text": [" ", ""]}), DataConfig())
