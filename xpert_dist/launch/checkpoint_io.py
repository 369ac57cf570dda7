"""Atomic, verifiable checkpoint directories (any files, any layout).

A checkpoint is complete exactly when its final directory exists: it is written into a
hidden temporary directory next to it (``.tmp-<name>-...``), a ``CHECKSUMS.json`` listing
every file with its size and sha256 is added, everything is fsynced, and only then is the
temporary directory renamed (``os.replace``) to the final name. A job killed at any point
leaves either the previous state or the new complete checkpoint, never a half one under a
real name. `latest_complete` ignores hidden (temporary/old) and unlisted directories.

Multi-rank writers (e.g. ``deepspeed engine.save_checkpoint`` where every rank writes its
shards): pass ``barrier`` (e.g. ``torch.distributed.barrier``) and ``is_main``; all ranks
write into the same deterministic temporary directory, the main rank seals and renames it.
The directory must be on a filesystem every rank sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..errors import XpertError

log = logging.getLogger(__name__)

CHECKSUMS = "CHECKSUMS.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
_CHUNK = 8 << 20


class CheckpointError(XpertError, RuntimeError):
    """A checkpoint directory is incomplete or does not match its CHECKSUMS.json."""


# ----------------------------------------------------------------------------- hashing

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != CHECKSUMS:
                out.append(rel)
    return out


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_and_sync(root: Path, rel: str, hashing: bool) -> tuple[str, dict]:
    p = root / rel
    if p.is_symlink():
        raise CheckpointError(f"checkpoint {root}: {rel} is a symlink; write real files")
    _fsync_path(p)
    entry = {"size": p.stat().st_size}
    if hashing:
        entry["sha256"] = sha256_file(p)
    return rel, entry


def _seal(root: Path, hashing: bool, workers: int | None) -> dict:
    rels = _files(root)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # hashlib releases the GIL
        entries = dict(pool.map(lambda r: _hash_and_sync(root, r, hashing), rels))
    manifest = {"format": 1, "algorithm": "sha256" if hashing else "size",
                "created": time.time(), "files": entries}
    tmp = root / (CHECKSUMS + ".part")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / CHECKSUMS)
    for dirpath, _dirs, _files_ in os.walk(root):
        _fsync_path(Path(dirpath), directory=True)
    return manifest


# ----------------------------------------------------------------------------- writing

def write_atomic_dir(final_dir: str | Path, writer_fn: Callable[[Path], object], *,
                     overwrite: bool = True, hashing: bool = True, workers: int | None = None,
                     barrier: Callable[[], object] | None = None, is_main: bool = True) -> Path:
    """Create ``final_dir`` atomically from whatever ``writer_fn(tmp_dir)`` writes into ``tmp_dir``.

    If ``writer_fn`` raises, the temporary directory is removed, nothing appears under
    ``final_dir`` and an existing ``final_dir`` is untouched; the exception propagates.
    ``overwrite``: replace an existing ``final_dir`` (the old one is moved aside, then removed;
    with False an existing one raises FileExistsError). ``hashing=False`` records only file
    sizes (for very large checkpoints when the time before a kill is short).
    ``barrier``/``is_main``: see module doc (collective writers).
    """
    final_dir = Path(final_dir)
    parent = final_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    if final_dir.exists() and not overwrite:
        raise FileExistsError(f"checkpoint {final_dir} exists and overwrite=False")
    collective = barrier is not None
    if collective:
        tmp = parent / f"{TMP_PREFIX}{final_dir.name}"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
    else:
        tmp = parent / f"{TMP_PREFIX}{final_dir.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    try:
        writer_fn(tmp)
        if collective:
            barrier()
        if is_main:
            _seal(tmp, hashing, workers)
            old = None
            if final_dir.exists():
                old = parent / f"{OLD_PREFIX}{final_dir.name}-{uuid.uuid4().hex[:8]}"
                os.replace(final_dir, old)
            os.replace(tmp, final_dir)
            _fsync_path(parent, directory=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if is_main or not collective:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if collective:
        barrier()
    return final_dir


# ----------------------------------------------------------------------------- reading

def read_checksums(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / CHECKSUMS
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory} has no {CHECKSUMS}: incomplete or not written "
                              f"by write_atomic_dir")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data.get("files"), dict):
            raise TypeError("no 'files' mapping")
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory}: unreadable {CHECKSUMS}: {e}") from e
    return data


def verify_dir(directory: str | Path, *, quick: bool = False) -> None:
    """Raise `CheckpointError` naming every missing, extra, resized or changed file.

    ``quick=True`` checks presence and sizes only (no hashing).
    """
    directory = Path(directory)
    data = read_checksums(directory)
    listed: dict = data["files"]
    present = set(_files(directory))
    problems = []
    for rel in sorted(set(listed) - present):
        problems.append(f"missing file {rel}")
    for rel in sorted(present - set(listed)):
        problems.append(f"unexpected file {rel} (not in {CHECKSUMS})")
    for rel in sorted(set(listed) & present):
        entry = listed[rel]
        size = (directory / rel).stat().st_size
        if size != entry.get("size"):
            problems.append(f"{rel}: size {size} != recorded {entry.get('size')}")
            continue
        if not quick and "sha256" in entry:
            digest = sha256_file(directory / rel)
            if digest != entry["sha256"]:
                problems.append(f"{rel}: sha256 {digest[:12]}... != recorded {entry['sha256'][:12]}...")
    if problems:
        raise CheckpointError(f"checkpoint {directory} failed verification: " + "; ".join(problems))


def _order_key(path: Path) -> tuple:
    nums = re.findall(r"\d+", path.name)
    try:
        mtime = (path / CHECKSUMS).stat().st_mtime
    except OSError:
        mtime = 0.0
    return (1, int(nums[-1]), mtime) if nums else (0, 0, mtime)


def complete_checkpoints(checkpoints_root: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``checkpoints_root``, oldest first.

    Order: by the last number in the name (``step-000012`` -> 12), then by seal time; names
    without a number sort before numbered ones. Hidden directories (temporary, old) and
    directories without CHECKSUMS.json are ignored.
    """
    root = Path(checkpoints_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and not p.name.startswith(".") and (p / CHECKSUMS).is_file()]
    return sorted(found, key=_order_key)


def latest_complete(checkpoints_root: str | Path, *, verify: bool = False) -> Path | None:
    """The newest complete checkpoint, or None.

    Always checks file presence and sizes against CHECKSUMS.json; ``verify=True`` also
    re-hashes. A checkpoint that fails is skipped (with a warning) in favour of an older one.
    """
    for path in reversed(complete_checkpoints(checkpoints_root)):
        try:
            verify_dir(path, quick=not verify)
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
            continue
        return path
    return None


def prune_old(checkpoints_root: str | Path, keep: int = 2) -> list[Path]:
    """Delete older checkpoints, keeping the newest ``keep`` that pass the quick check (presence
    and sizes), and stale hidden temp dirs; return what was removed.

    A damaged checkpoint never counts towards ``keep``, so the one `latest_complete` would
    resume from is never deleted; damaged ones newer than the kept ones are left for inspection.
    """
    root = Path(checkpoints_root)
    removed: list[Path] = []
    complete = complete_checkpoints(root)
    valid = []
    for p in complete:
        try:
            verify_dir(p, quick=True)
            valid.append(p)
        except CheckpointError:
            pass
    kept = valid[-keep:] if keep > 0 else []
    if kept:
        oldest_kept = complete.index(kept[0])
        doomed = [p for p in complete[:oldest_kept] if p not in kept]
    else:
        doomed = [p for p in complete if p in valid]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(OLD_PREFIX) or p.name.startswith(TMP_PREFIX)):
                # temp dirs of a crashed writer (call this only when no writer is active)
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed
