"""Atomic checkpoint directories: all or nothing, verified by checksums."""
from __future__ import annotations

import json
import threading

import pytest

from xpert_dist.launch import checkpoint_io as C


def write_files(files: dict):
    def writer(d):
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
    return writer


def test_write_and_verify(tmp_path):
    final = C.write_atomic_dir(tmp_path / "ckpt" / "step-00000003",
                               write_files({"a.bin": b"x" * 1000, "sub/b.json": b"{}"}))
    assert sorted(p.name for p in final.parent.iterdir()) == ["step-00000003"]  # no temp dir left
    sums = json.loads((final / C.CHECKSUMS).read_text())
    assert set(sums["files"]) == {"a.bin", "sub/b.json"} and sums["files"]["a.bin"]["size"] == 1000
    C.verify_dir(final)
    assert C.latest_complete(tmp_path / "ckpt") == final


def test_failing_writer_leaves_nothing_and_keeps_previous(tmp_path):
    root = tmp_path / "ckpt"
    prev = C.write_atomic_dir(root / "step-1", write_files({"w.bin": b"old"}))

    def broken(d):
        (d / "w.bin").write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        C.write_atomic_dir(root / "step-2", broken)
    assert not (root / "step-2").exists()
    assert [p.name for p in root.iterdir()] == ["step-1"]  # temp dir removed too
    # overwriting an existing checkpoint with a failing writer keeps the old content
    with pytest.raises(RuntimeError):
        C.write_atomic_dir(root / "step-1", broken)
    assert (prev / "w.bin").read_bytes() == b"old"
    C.verify_dir(prev)
    assert C.latest_complete(root) == prev


def test_corruption_fails_verification(tmp_path):
    d = C.write_atomic_dir(tmp_path / "c", write_files({"a.bin": b"0123456789", "b.bin": b"zz"}))
    (d / "a.bin").write_bytes(b"0123456780")  # same size, different bytes
    with pytest.raises(C.CheckpointError, match=r"a\.bin: sha256"):
        C.verify_dir(d)
    C.verify_dir(d, quick=True)  # sizes still match
    (d / "b.bin").unlink()
    (d / "extra.txt").write_text("?")
    with pytest.raises(C.CheckpointError) as e:
        C.verify_dir(d, quick=True)
    assert "missing file b.bin" in str(e.value) and "unexpected file extra.txt" in str(e.value)
    (d / C.CHECKSUMS).unlink()
    with pytest.raises(C.CheckpointError, match="no CHECKSUMS.json"):
        C.verify_dir(d)


def test_latest_complete_ignores_temp_incomplete_and_corrupt(tmp_path):
    root = tmp_path / "checkpoints"
    assert C.latest_complete(root) is None
    s2 = C.write_atomic_dir(root / "step-00000002", write_files({"m": b"2"}))
    s10 = C.write_atomic_dir(root / "step-00000010", write_files({"m": b"10"}))
    (root / ".tmp-step-00000012-123-abcd").mkdir()          # a writer killed mid-way
    (root / "step-00000011").mkdir()                         # no CHECKSUMS.json: incomplete
    (root / "step-00000011" / "m").write_bytes(b"11")
    assert C.latest_complete(root) == s10                    # numeric order, not lexical
    (s10 / "m").write_bytes(b"XXX")                          # corrupt (size changed): skipped
    assert C.latest_complete(root) == s2
    removed = C.prune_old(root, keep=1)
    assert root / ".tmp-step-00000012-123-abcd" in removed and s2.exists()


def test_overwrite_flag(tmp_path):
    d = C.write_atomic_dir(tmp_path / "x", write_files({"a": b"1"}))
    with pytest.raises(FileExistsError):
        C.write_atomic_dir(d, write_files({"a": b"2"}), overwrite=False)
    C.write_atomic_dir(d, write_files({"a": b"2"}))
    assert (d / "a").read_bytes() == b"2" and not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_collective_writers_share_one_temp_dir(tmp_path):
    """Two 'ranks' (threads) write their shards; the main one seals and renames."""
    barrier = threading.Barrier(2)
    errors = []

    def rank(r):
        try:
            C.write_atomic_dir(tmp_path / "ck" / "step-5",
                               lambda d: (d / f"shard-{r}.pt").write_bytes(bytes([r]) * 10),
                               barrier=barrier.wait, is_main=r == 0)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    final = tmp_path / "ck" / "step-5"
    assert sorted(json.loads((final / C.CHECKSUMS).read_text())["files"]) == ["shard-0.pt", "shard-1.pt"]
    C.verify_dir(final)


def test_size_only_mode(tmp_path):
    d = C.write_atomic_dir(tmp_path / "big", write_files({"a": b"abc"}), hashing=False)
    assert "sha256" not in json.loads((d / C.CHECKSUMS).read_text())["files"]["a"]
    C.verify_dir(d)


def test_prune_old_keeps_newest_valid(tmp_path):
    root = tmp_path / "checkpoints"
    paths = [C.write_atomic_dir(root / f"step-{i}", write_files({"m": b"%d" % i})) for i in (1, 2, 3, 4)]
    (paths[3] / "m").write_bytes(b"corrupt")
    C.prune_old(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3", "step-4"]
    assert C.latest_complete(root) == paths[2]
