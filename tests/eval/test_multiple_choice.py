"""choice_accuracy against an unbatched per-option reference, and on models whose answers are rigged."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset

from xpert_dist.data.sources import load_records
from xpert_dist.errors import ConfigError
from xpert_dist.eval.multiple_choice import (ChoiceItem, casehold_items, choice_accuracy, pubmedqa_items,
                                             score_items)


def reference_scores(model, tok, items, max_len):
    """One unpadded forward per option; float64 log-softmax; the same left truncation rule."""
    out = []
    with torch.no_grad():
        for item in items:
            ctx = tok.encode(item.prompt)
            row = []
            for opt in item.options:
                cont = tok.encode(item.delimiter + opt)[-max_len:]  # an over-long option keeps its end
                full = (ctx + cont)[-(max_len + 1):]
                logits = model(input_ids=torch.tensor([full[:-1]])).logits[0].double()
                logp = torch.log_softmax(logits, -1)
                n = len(cont)
                positions = range(len(full) - 1 - n, len(full) - 1)
                row.append(sum(float(logp[p, full[p + 1]]) for p in positions))
            out.append(row)
    return out


def argmax(xs):
    return max(range(len(xs)), key=lambda j: (xs[j], -j))


@pytest.fixture
def items(sample_data):
    pub = pubmedqa_items(load_records("pubmedqa").select(range(3)))
    case = casehold_items(load_records("casehold").select(range(2)))
    short = [ChoiceItem("The sky is", ("blue", "green", "a very long option text"), 0),
             ChoiceItem("Grade:", ("A", "B", "C"), 1, delimiter="")]  # one-token options: one shared input
    return pub + case + short


def test_task_items_from_records(sample_data):
    raw = [json.loads(x) for x in (sample_data / "health/pubmedqa_test.jsonl").read_text().splitlines()[:4]]
    pub = pubmedqa_items(load_records("pubmedqa").select(range(4)))
    for r, it in zip(raw, pub):
        assert it.prompt == f"Abstract: {r['context']}\nQuestion: {r['question']}\nAnswer:"
        assert it.options == ("yes", "no", "maybe") and it.options[it.label] == r["answer"]
    contexts = ["See Smith (holding x). Also Doe, 1 U.S. 2 (<HOLDING>). More.", "No marker here. "]
    ds = Dataset.from_dict({"id": ["1", "2"], "context": contexts, "endings": [["a", "b", "c", "d", "e"]] * 2,
                            "label": [3, 0]})
    marked, unmarked = casehold_items(ds)
    assert marked.prompt == "See Smith (holding x). Also Doe, 1 U.S. 2 (" and marked.label == 3
    assert unmarked.prompt == "No marker here. (" and unmarked.options == ("a", "b", "c", "d", "e")
    with pytest.raises(ConfigError, match="answer 'perhaps'"):
        pubmedqa_items(Dataset.from_dict({"id": ["9"], "question": ["q"], "context": ["c"],
                                          "answer": ["perhaps"]}))


def test_batched_equals_unbatched_reference(tiny_model, tiny_model64, tok, items):
    max_len = 192  # the task prompts are longer: left truncation is exercised; the short item is not cut
    ref64 = reference_scores(tiny_model64, tok, items, max_len)
    got64 = score_items(tiny_model64, tok, items, batch_size=3, max_len=max_len, progress=False)
    assert [len(r) for r in got64] == [len(it.options) for it in items]
    for r, g in zip(ref64, got64):
        assert all(abs(a - b) < 1e-8 for a, b in zip(r, g))
    got32 = score_items(tiny_model, tok, items, batch_size=4, max_len=max_len, progress=False)
    for r, g in zip(ref64, got32):  # float32 model, batched and padded, vs the float64 reference
        assert all(abs(a - b) < 1e-5 * max(1.0, abs(a)) for a, b in zip(r, g))
        assert argmax(r) == argmax(g)
    res = choice_accuracy(tiny_model64, tok, items, batch_size=2, max_len=max_len, progress=False)
    expected = sum(argmax(r) == it.label for r, it in zip(ref64, items)) / len(items)
    normed = [[s / len(o) for s, o in zip(r, it.options)] for r, it in zip(ref64, items)]
    expected_norm = sum(argmax(r) == it.label for r, it in zip(normed, items)) / len(items)
    assert res == {"acc": expected, "acc_norm": expected_norm, "n": len(items)}


def test_batch_size_does_not_change_scores(tiny_model, tok, items):
    one = score_items(tiny_model, tok, items, batch_size=1, max_len=64, progress=False)
    many = score_items(tiny_model, tok, items, batch_size=len(items), max_len=64, progress=False)
    assert all(abs(a - b) < 1e-4 for r, g in zip(one, many) for a, b in zip(r, g))


def test_options_with_identical_inputs_share_one_forward(tiny_model, tok):
    """One-token options after the same prompt need one model row; scores equal the per-option reference."""
    items = [ChoiceItem(f"Question {i}:", ("x", "y", "z"), 0, delimiter="") for i in range(2)]
    seen = []

    class Counting(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, **kw):
            seen.append(input_ids.shape[0])
            return tiny_model(input_ids=input_ids, attention_mask=attention_mask, **kw)

    got = score_items(Counting(), tok, items, batch_size=2, max_len=64, progress=False)
    assert seen == [2]  # 2 items x 3 options -> 2 distinct inputs
    ref = reference_scores(tiny_model, tok, items, 64)
    assert all(abs(a - b) < 1e-5 for r, g in zip(ref, got) for a, b in zip(r, g))


class Rigged(torch.nn.Module):
    """Logits that ignore the input: ``boost`` on the favoured token ids, 0 elsewhere (vocab 256)."""

    def __init__(self, favoured: bytes, boost: float = 20.0):
        super().__init__()
        self.bias = torch.zeros(256)
        self.bias[list(favoured)] = boost

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, 256).clone())


def pubmed_like(labels):
    return [ChoiceItem(f"Question {i}?\nAnswer:", ("yes", "no", "maybe"), lab) for i, lab in enumerate(labels)]


def test_rigged_model_picks_the_forced_answer(tok):
    items = pubmed_like([1, 1, 0, 2, 1, 0])  # "no" is right for 3 of 6
    res = choice_accuracy(Rigged(b" no"), tok, items, batch_size=4, progress=False)
    assert res == {"acc": 0.5, "acc_norm": 0.5, "n": 6}
    res = choice_accuracy(Rigged(b" yes"), tok, items, batch_size=4, progress=False)
    assert res["acc"] == pytest.approx(2 / 6)
    scores = score_items(Rigged(b" no"), tok, items[:1], progress=False)[0]
    assert scores[1] == pytest.approx(3 * -math.log(3 + 253 * math.exp(-20)), abs=1e-5)


def test_acc_norm_divides_by_option_characters(tok):
    # Uniform logits: every token costs log(256), so acc picks the fewest tokens (" no", 3) while
    # acc_norm picks the best cost per character: " maybe" 6/5 < " yes" 4/3 < " no" 3/2.
    items = pubmed_like([1, 1, 2])
    res = choice_accuracy(Rigged(b""), tok, items, progress=False)
    assert res == {"acc": pytest.approx(2 / 3), "acc_norm": pytest.approx(1 / 3), "n": 3}
    scores = score_items(Rigged(b""), tok, items[:1], progress=False)[0]
    assert scores == pytest.approx([-4 * math.log(256), -3 * math.log(256), -6 * math.log(256)])


def test_errors(tiny_model, tok):
    with pytest.raises(ConfigError, match="no items"):
        choice_accuracy(tiny_model, tok, [], progress=False)
    with pytest.raises(ConfigError, match="batch_size=0"):
        choice_accuracy(tiny_model, tok, pubmed_like([0]), batch_size=0, progress=False)


def test_peft_wrapped_model_scores_like_its_base(tiny_model, tok):
    import copy

    from peft import LoraConfig, get_peft_model

    items = pubmed_like([0, 1]) + [ChoiceItem("Holding: (", ("a", "bb"), 1, delimiter="")]
    wrapped = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    base = score_items(tiny_model, tok, items, progress=False)
    got = score_items(wrapped, tok, items, progress=False)  # adapter B is zero at init
    assert all(abs(a - b) < 1e-5 for r, g in zip(base, got) for a, b in zip(r, g))


class Recording(torch.nn.Module):
    """Passes through to ``model``, recording each forward's input shape; ``attn`` sets the attention kernel
    the scorer sees in ``config._attn_implementation``."""

    def __init__(self, model, attn=None):
        super().__init__()
        self.inner, self.shapes = [model], []  # a list: not registered as a submodule
        self.config = SimpleNamespace(_attn_implementation=attn or model.config._attn_implementation)

    def get_input_embeddings(self):
        return self.inner[0].get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, **kw):
        self.shapes.append(tuple(input_ids.shape))
        return self.inner[0](input_ids=input_ids, attention_mask=attention_mask, **kw)


def test_prompt_computed_once_per_item(tiny_model64, tok, sample_data):
    """Multi-token options (CaseHOLD holdings): one row per item, prompt + every holding, and the scores equal
    one float64 forward per option; a kernel without custom masks falls back to one row per option."""
    items = casehold_items(load_records("casehold").select(range(3)))
    max_len = 4096  # nothing cut: every option sees the whole prompt
    ref = reference_scores(tiny_model64, tok, items, max_len)
    packed = Recording(tiny_model64)
    got = score_items(packed, tok, items, batch_size=3, max_len=max_len, progress=False)
    def cont_len(it, opt):
        return len(tok.encode(it.prompt + it.delimiter + opt)) - len(tok.encode(it.prompt.rstrip()))

    # a row: the prompt once, then each option's tokens but its last (which is only predicted)
    width = max(len(tok.encode(it.prompt.rstrip())) + sum(cont_len(it, o) - 1 for o in it.options) for it in items)
    assert packed.shapes == [(3, width)]  # 3 items, one row each
    for r, g in zip(ref, got):
        assert all(abs(a - b) < 1e-8 * max(1.0, abs(a)) for a, b in zip(r, g))
    flash = Recording(tiny_model64, attn="flash_attention_2")
    again = score_items(flash, tok, items, batch_size=3, max_len=max_len, progress=False)
    assert flash.shapes[0][0] == sum(len(it.options) for it in items)  # one row per option
    for r, g in zip(ref, again):
        assert all(abs(a - b) < 1e-8 * max(1.0, abs(a)) for a, b in zip(r, g))


def test_packed_rows_under_eager_attention(tiny_model64, tok, sample_data):
    """Eager attention takes the block-causal mask as an additive float mask: same scores as the reference."""
    import copy

    eager = copy.deepcopy(tiny_model64)
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager"
    items = casehold_items(load_records("casehold").select(range(2))) + pubmed_like([0])
    ref = reference_scores(tiny_model64, tok, items, 4096)
    got = score_items(eager, tok, items, batch_size=3, max_len=4096, progress=False)
    for r, g in zip(ref, got):
        assert all(abs(a - b) < 1e-8 * max(1.0, abs(a)) for a, b in zip(r, g))
