"""The lm-evaluation-harness task files (xpert_dist/eval/lm_eval_tasks) are well formed and score the
same items as the project's evaluator, checked without lm_eval itself (it is not a dependency):

- each YAML parses (``!function`` resolved the way lm_eval does: ``<module>.py`` beside the YAML) and
  has the keys a multiple-choice task needs;
- the referenced data files exist and hold the fields the templates use;
- ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` rendered with lm_eval's Jinja settings on
  real records give exactly the prompt, options and label of ``xpert_dist.eval.multiple_choice``.

A real lm_eval run on an exported model, compared number by number with the project's evaluator, is
``bench/shift/lm_eval_check.py`` (docs/analysis.md).
"""
import ast
import importlib.util
from pathlib import Path

import jinja2
import pytest
import yaml

from xpert_dist.data.sources import SAMPLE_DIR, data_root, load_records
from xpert_dist.eval.multiple_choice import casehold_items, pubmedqa_items

TASK_DIR = Path(__file__).resolve().parents[2] / "xpert_dist" / "eval" / "lm_eval_tasks"
TASKS = {"xpert_pubmedqa": ("pubmedqa", pubmedqa_items), "xpert_casehold": ("casehold", casehold_items)}
# lm_eval.utils: Environment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
ENV = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


class _Loader(yaml.SafeLoader):
    pass


def _load_yaml(path: Path) -> dict:
    """Parse a task YAML resolving ``!function module.name`` like lm_eval.utils.import_function."""
    def import_function(loader, node):
        *module, name = loader.construct_scalar(node).split(".")
        module_path = path.parent / f"{'.'.join(module)}.py"
        assert module_path.is_file(), f"{path.name}: !function module {module_path} is missing"
        spec = importlib.util.spec_from_file_location(".".join(module), module_path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        assert hasattr(mod, name), f"{path.name}: {module_path.name} has no function {name}"
        return getattr(mod, name)

    _Loader.add_constructor("!function", import_function)
    return yaml.load(path.read_text(), Loader=_Loader)


def _tasks_module():
    spec = importlib.util.spec_from_file_location("xpert_tasks", TASK_DIR / "xpert_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _render(template, doc):
    return ENV.from_string(template).render(**doc) if isinstance(template, str) else template


@pytest.fixture(scope="module")
def configs():
    found = {p.stem: _load_yaml(p) for p in sorted(TASK_DIR.glob("*.yaml"))}
    assert set(TASKS) <= set(found), f"task files found: {sorted(found)}"
    return found


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_yaml_structure(configs, task):
    cfg = configs[task]
    assert cfg["task"] == task
    assert cfg["output_type"] == "multiple_choice"
    assert cfg["test_split"] == "test"
    for key in ("doc_to_text", "doc_to_choice", "doc_to_target"):
        assert isinstance(cfg[key], str) and "{{" in cfg[key], key
    assert callable(cfg["custom_dataset"]) and callable(cfg["process_docs"])
    metrics = {m["metric"]: m for m in cfg["metric_list"]}
    assert set(metrics) == {"acc", "acc_norm"}
    assert all(m["aggregation"] == "mean" and m["higher_is_better"] is True for m in metrics.values())
    assert "version" in cfg["metadata"]


@pytest.mark.parametrize("root", ["default", "sample"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_templates_render_the_projects_items(configs, task, root, monkeypatch):
    if root == "sample":
        monkeypatch.setenv("XPERT_DATA_DIR", str(SAMPLE_DIR))
    cfg = configs[task]
    alias, build = TASKS[task]
    # the data file the task reads is the project's alias file, from the same data root
    xt = _tasks_module()
    assert xt.data_file(alias).is_file()
    assert xt.data_root() == data_root()
    # lm_eval calls custom_dataset(**metadata, **dataset_kwargs), then process_docs on the test split
    dataset = cfg["custom_dataset"](**cfg.get("metadata", {}), **(cfg.get("dataset_kwargs") or {}))
    assert cfg["test_split"] in dataset
    raw = dataset[cfg["test_split"]]
    needed = {"pubmedqa": {"question", "context", "answer"}, "casehold": {"context", "endings", "label"}}[alias]
    assert needed <= set(raw.column_names)
    n = min(len(raw), 25)
    docs = cfg["process_docs"](raw.select(range(n)))
    items = build(load_records(alias).select(range(n)))
    for doc, item in zip(docs, items):
        text = _render(cfg["doc_to_text"], doc)
        choices = ast.literal_eval(_render(cfg["doc_to_choice"], doc))
        target = _render(cfg["doc_to_target"], doc)
        assert text == item.prompt
        assert tuple(choices) == item.options
        assert target.isdigit() and int(target) == item.label  # lm_eval reads a digit string as an index
        assert cfg.get("target_delimiter", " ") == item.delimiter
    assert len(docs) == n > 0


def test_missing_data_names_the_file(tmp_path, monkeypatch):
    xt = _tasks_module()
    monkeypatch.setenv("XPERT_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="pubmedqa_test.jsonl"):
        xt.load_pubmedqa()
