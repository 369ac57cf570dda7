"""perplexity() against a token-by-token float64 loop and against the model's own loss."""
import json
import math

import torch

from xpert_dist.eval.perplexity import heldout_windows, perplexity


def hand_perplexity(model, windows):
    """Each token scored by its own forward over the prefix, log-softmax in float64."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            for t in range(1, w.numel()):
                logits = model(input_ids=w[:t].unsqueeze(0)).logits[0, -1].double()
                nll -= float(torch.log_softmax(logits, -1)[w[t]])
                n += 1
    return math.exp(nll / n)


def windows_of(seed, n=3, length=12):
    return torch.randint(0, 255, (n, length), generator=torch.Generator().manual_seed(seed))


def test_matches_hand_loop_in_float64(tiny_model, tiny_model64):
    w = windows_of(0)
    oracle = hand_perplexity(tiny_model64, w)
    assert 100 < oracle < 1000  # a random model is near uniform over 256 tokens
    assert math.isclose(perplexity(tiny_model64, w, batch_size=2, progress=False), oracle, rel_tol=1e-9)
    assert math.isclose(perplexity(tiny_model, w, batch_size=2, progress=False), oracle, rel_tol=1e-5)


def test_matches_model_loss_and_batch_size(tiny_model):
    w = windows_of(1, n=4, length=32)
    with torch.no_grad():
        loss = tiny_model(input_ids=w[:1], labels=w[:1]).loss
    assert math.isclose(perplexity(tiny_model, w[:1], progress=False), math.exp(float(loss)), rel_tol=1e-5)
    one = perplexity(tiny_model, w, batch_size=1, progress=False)
    assert math.isclose(one, perplexity(tiny_model, w, batch_size=3, progress=False), rel_tol=1e-6)


def test_peft_wrapped_and_training_mode_restored(tiny_model):
    import copy

    from peft import LoraConfig, get_peft_model

    w = windows_of(2)
    base = perplexity(tiny_model, w, progress=False)
    wrapped = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    wrapped.train()
    assert math.isclose(perplexity(wrapped, w, progress=False), base, rel_tol=1e-6)  # LoRA B starts at zero
    assert wrapped.training
    with torch.no_grad():  # a non-zero adapter changes the result
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    assert not math.isclose(perplexity(wrapped, w, progress=False), base, rel_tol=1e-3)


def test_heldout_windows_are_the_heldout_text(sample_data, tok):
    records = [json.loads(x) for x in (sample_data / "health/medquad_train.jsonl").read_text().splitlines()]
    tail = records[len(records) - len(records) // 10:]
    stream = []
    for r in tail:
        if stream:
            stream.append(255)
        stream.extend(b % 255 for b in r["text"].encode())
    w = heldout_windows("health_heldout", tok, 64, 5)
    assert w.shape == (5, 64)
    assert w.flatten().tolist() == stream[:320]
    everything = heldout_windows("health_heldout", tok, 64, None)
    assert everything.shape[0] == len(stream) // 64
    assert heldout_windows("health_heldout", tok, 64, 10**6).shape == everything.shape  # fewer: logged
