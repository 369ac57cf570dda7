"""Packing, prompt/completion masking and calibration sampling, checked against byte-level oracles.

ByteTokenizer(256) maps ASCII text to its byte values and uses 255 as EOS/PAD, so the expected token
streams can be written down directly from ``str.encode``.
"""
import pytest
import torch

from xpert_dist.data.tokenize import (IGNORE_INDEX, calibration_batch, check_seq_len, encode_prompt_completion,
                                      pack_texts)
from xpert_dist.errors import ConfigError
from xpert_dist.models.loading import ByteTokenizer

TOK = ByteTokenizer(256)
EOS = 255
DOCS = ["The quick brown fox.", "jumps", "over the lazy dog, again and again and again.", "", "end"]


def stream_of(texts):
    out = []
    for t in texts:
        if out:
            out.append(EOS)
        out.extend(t.encode())
    return out


def test_pack_texts_round_trip():
    stream = stream_of(DOCS)
    total = sum(len(d.encode()) for d in DOCS) + len(DOCS) - 1
    assert len(stream) == total
    for seq_len in (1, 7, 16, total):
        blocks = pack_texts(DOCS, TOK, seq_len)
        n = total // seq_len
        assert blocks.shape == (n, seq_len) and blocks.dtype == torch.long
        assert blocks.flatten().tolist() == stream[: n * seq_len]
        assert blocks.numel() + total % seq_len == total  # only the incomplete tail is dropped
    assert pack_texts(DOCS, TOK, 8, max_blocks=3).flatten().tolist() == stream[:24]
    many = [f"document number {i} " * 3 for i in range(500)]
    assert pack_texts(many, TOK, 32, max_blocks=2).flatten().tolist() == stream_of(many)[:64]
    with pytest.raises(ConfigError, match="fewer than one block"):
        pack_texts(["abc"], TOK, 10)
    with pytest.raises(ConfigError, match="max_blocks"):
        pack_texts(DOCS, TOK, 4, max_blocks=0)


def test_prompt_completion_labels_mask_exactly_the_prompt():
    pairs = [("Question: 2+2?\nAnswer:", " 4"), ("Hi", " there, friend"), ("", "x")]
    ids, labels, mask = encode_prompt_completion(pairs, TOK, 32)
    assert ids.shape == labels.shape == mask.shape == (3, 32)
    for i, (p, c) in enumerate(pairs):
        pt, ct = list(p.encode()), list(c.encode()) + [EOS]
        n = len(pt) + len(ct)
        assert ids[i, :n].tolist() == pt + ct
        assert ids[i, n:].eq(EOS).all()  # pad id of ByteTokenizer
        assert labels[i].tolist() == [IGNORE_INDEX] * len(pt) + ct + [IGNORE_INDEX] * (32 - n)
        assert mask[i].tolist() == [1] * n + [0] * (32 - n)


def test_prompt_truncated_from_the_left():
    prompt, completion = "abcdefghijklmnopqrstuvwxyz", "XYZ"
    ids, labels, mask = encode_prompt_completion([(prompt, completion)], TOK, 10)
    # 4 completion tokens (XYZ + EOS) keep the last 6 prompt tokens
    assert ids[0].tolist() == list(b"uvwxyz") + list(b"XYZ") + [EOS]
    assert labels[0].tolist() == [IGNORE_INDEX] * 6 + list(b"XYZ") + [EOS]
    assert mask[0].sum() == 10
    ids, labels, _ = encode_prompt_completion([("prompt", "a completion longer than the window")], TOK, 8)
    assert ids[0].tolist() == [ord("t")] + list(b"a compl")
    assert labels[0].tolist() == [IGNORE_INDEX] + list(b"a compl")


def is_substring(row, stream):
    n = len(row)
    return any(stream[i:i + n] == row for i in range(len(stream) - n + 1))


def test_calibration_batch_seeded_windows():
    texts = [f"record {i}: " + "lorem ipsum dolor sit amet " * (i % 4) for i in range(40)]
    a = calibration_batch(texts, TOK, 12, 48, seed=0)
    b = calibration_batch(texts, TOK, 12, 48, seed=0)
    c = calibration_batch(texts, TOK, 12, 48, seed=1)
    assert a.shape == (12, 48) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    stream = stream_of(texts)
    for row in torch.cat([a, c]).tolist():
        assert is_substring(row, stream)  # a contiguous window of the documents (EOS between them)


def test_calibration_batch_long_documents_stay_whole():
    long_a, long_b = "A" * 40 + "a" * 40, "B" * 40 + "b" * 40
    rows = calibration_batch([long_a, long_b], TOK, 20, 32, seed=3).tolist()
    for row in rows:  # short docs are not needed, so no window crosses a document boundary
        assert EOS not in row
        assert is_substring(row, list(long_a.encode())) or is_substring(row, list(long_b.encode()))


def test_calibration_batch_short_corpus_concatenates_and_errors():
    rows = calibration_batch(["ab", "cd", "ef", "gh"], TOK, 3, 8, seed=0).tolist()
    stream = stream_of(["ab", "cd", "ef", "gh"])
    assert all(is_substring(r, stream) for r in rows)
    with pytest.raises(ConfigError, match="fewer than calib_seq_len=64"):
        calibration_batch(["ab", "cd"], TOK, 2, 64, seed=0)
    with pytest.raises(ConfigError, match="calib_samples"):
        calibration_batch(["ab" * 50], TOK, 0, 8, seed=0)


def test_check_seq_len():
    assert check_seq_len(256, 256) == 256
    assert check_seq_len(4096, None) == 4096
    with pytest.raises(ConfigError, match=r"data.seq_len=257 exceeds the model's maximum context of 256"):
        check_seq_len(257, 256)
    with pytest.raises(ConfigError, match="eval.perplexity_seq_len=0"):
        check_seq_len(0, 256, "eval.perplexity_seq_len")
