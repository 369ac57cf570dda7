"""Where finished statistics wait until they are used: accelerator memory, host memory, or disk.

``StatsStore(kind, directory=None, budget_bytes=None)``:

* ``"memory"``: keeps the tensor object itself (no copy; the caller must not modify it).
* ``"cpu"``: a host copy, in pinned (page-locked) memory when CUDA is available, so that moving it
  back to the GPU is a fast asynchronous DMA; plain host memory otherwise.
* ``"disk"``: one raw file per statistic in ``directory``, read back memory-mapped (pages are
  loaded when touched, private mapping: writes to the returned tensor never reach the file).
  Written crash-safely: data and metadata go to temporary names, are fsynced, then renamed; a put
  that fails (I/O error, full disk) removes its temporary files, so a key is either fully stored or
  absent. ``durable=False`` skips the fsyncs (still temporary names, then renamed): for scratch that
  no restart reads (the pruner's smoothed scores and carried XᵀX: a resumed run restores them from its
  checkpoint), where an fsync only waits for the disk.

``budget_bytes`` bounds the bytes held by the store (all kinds); a put that would exceed it raises
:class:`StatsStoreError` naming the key, the budget and the location, before anything is written.
Read-back is bit-identical (raw bytes, dtype and shape kept). ``put_tensor``/``get_tensor`` store plain
tensors the same way (the pruner keeps its smoothed scores between prune steps here).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import XpertError
from .capture import MODES, InputStats

KINDS = ("memory", "cpu", "disk")
RAW = "raw"  # the mode recorded for plain tensors stored with put_tensor


class StatsStoreError(XpertError, RuntimeError):
    """A statistic could not be stored or read (unwritable directory, budget exceeded, missing key)."""


@dataclass
class _Entry:
    n: int
    mode: str
    nbytes: int
    tensor: torch.Tensor | None = None  # memory / cpu
    path: Path | None = None  # disk: data file
    meta: Path | None = None  # disk: metadata file
    shape: tuple = ()
    dtype: torch.dtype = torch.float32


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


class StatsStore:
    def __init__(self, kind: str = "memory", directory: str | os.PathLike | None = None,
                 budget_bytes: int | None = None, durable: bool = True):
        if kind not in KINDS:
            raise StatsStoreError(f"statistics store kind {kind!r} is not one of {', '.join(KINDS)}")
        if budget_bytes is not None and (not isinstance(budget_bytes, int) or budget_bytes < 0):
            raise StatsStoreError(f"statistics store budget_bytes={budget_bytes!r} must be a non-negative integer")
        self.kind = kind
        self.durable = durable
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._items: dict[str, _Entry] = {}
        self.directory: Path | None = None
        self.pinned = kind == "cpu" and torch.cuda.is_available()
        if kind == "disk":
            if directory is None:
                raise StatsStoreError("statistics store kind 'disk' needs a directory (prune.offload_dir)")
            self.directory = Path(directory)
            self._check_writable()

    @classmethod
    def from_config(cls, prune_cfg) -> "StatsStore":
        """From ``PruneConfig.offload`` (none|cpu|disk), ``offload_dir``, ``offload_budget_bytes``."""
        kind = {"none": "memory"}.get(prune_cfg.offload, prune_cfg.offload)
        return cls(kind, prune_cfg.offload_dir, prune_cfg.offload_budget_bytes)

    # ------------------------------------------------------------------ helpers
    def _where(self) -> str:
        return f"directory {self.directory}" if self.directory is not None else f"{self.kind} store"

    def _check_writable(self) -> None:
        d = self.directory
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=d)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StatsStoreError(f"statistics offload directory {d} is not writable: {e.strerror or e}") from e

    def _paths(self, key: str) -> tuple[Path, Path]:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)[:80]
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        base = self.directory / f"{slug}-{digest}"
        return base.with_name(base.name + ".stats"), base.with_name(base.name + ".json")

    # ------------------------------------------------------------------ API
    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list[str]:
        return sorted(self._items)

    def put(self, key: str, stats: InputStats) -> None:
        """Store ``stats`` (a resident statistic) under ``key``, replacing any previous value."""
        if not isinstance(stats, InputStats) or not stats.resident:
            raise StatsStoreError(f"cannot store {key!r}: only a resident statistic (with its full sum) can be "
                                  "stored")
        self._put(key, stats.sum.detach(), stats.n, stats.mode)

    def put_tensor(self, key: str, t: torch.Tensor) -> None:
        """Store a plain tensor (e.g. smoothed pruning scores kept between prune steps) under ``key``."""
        if not isinstance(t, torch.Tensor):
            raise StatsStoreError(f"cannot store {key!r}: expected a tensor, got {type(t).__name__}")
        self._put(key, t.detach(), 0, RAW)

    def _put(self, key: str, t: torch.Tensor, n: int, mode: str) -> None:
        nbytes = t.numel() * t.element_size()
        old = self._items.get(key)
        in_use = self.used_bytes - (old.nbytes if old else 0)
        if self.budget_bytes is not None and in_use + nbytes > self.budget_bytes:
            raise StatsStoreError(
                f"storing statistics {key!r} ({nbytes} bytes) would exceed the statistics budget of "
                f"{self.budget_bytes} bytes ({in_use} bytes in use) in the {self._where()}; raise "
                "prune.offload_budget_bytes or offload to disk")
        entry = _Entry(n, mode, nbytes, shape=tuple(t.shape), dtype=t.dtype)
        if self.kind == "memory":
            entry.tensor = t
        elif self.kind == "cpu":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned)
            host.copy_(t)
            entry.tensor = host
        else:
            entry.path, entry.meta = self._write(key, t, n, mode)
        if old is not None:
            self._drop(old, keep_files=(old.path == entry.path))
        self._items[key] = entry
        self.used_bytes = in_use + nbytes

    def _write(self, key: str, t: torch.Tensor, n: int, mode: str) -> tuple[Path, Path]:
        path, meta = self._paths(key)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp_data, tmp_meta = path.with_name(path.name + tag), meta.with_name(meta.name + tag)
        info = {"key": key, "shape": list(t.shape), "dtype": _dtype_name(t.dtype), "n": n,
                "mode": mode, "nbytes": t.numel() * t.element_size(), "format": 1}
        try:
            raw = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
            with open(tmp_data, "wb") as f:
                f.write(memoryview(raw))
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            with open(tmp_meta, "w") as f:
                json.dump(info, f)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            os.replace(tmp_data, path)
            os.replace(tmp_meta, meta)  # the metadata file is the commit record
            if self.durable:
                dfd = os.open(self.directory, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        except OSError as e:
            for p in (tmp_data, tmp_meta):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
            try:  # a half-committed pair (data renamed, metadata not) is removed too
                if not meta.exists():
                    path.unlink(missing_ok=True)
            except OSError:
                pass
            raise StatsStoreError(f"could not write statistics {key!r} to {self._where()}: "
                                  f"{e.strerror or e}") from e
        return path, meta

    def get(self, key: str, device: torch.device | str | None = None) -> InputStats:
        """The statistic stored under ``key`` (bit-identical); ``device`` moves it (non-blocking from pinned)."""
        entry = self._items.get(key)
        if entry is not None and entry.mode == RAW:
            raise StatsStoreError(f"{key!r} holds a plain tensor: read it with get_tensor")
        return InputStats(self._tensor(key, device), entry.n, entry.mode)

    def get_tensor(self, key: str, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor stored under ``key`` by :meth:`put_tensor` (bit-identical)."""
        return self._tensor(key, device)

    def _tensor(self, key: str, device) -> torch.Tensor:
        entry = self._items.get(key)
        if entry is None:
            raise StatsStoreError(f"no statistics stored under {key!r} in the {self._where()}")
        t = entry.tensor if entry.tensor is not None else self._read(key, entry)
        if device is not None:
            t = t.to(device, non_blocking=self.pinned)
        return t

    def _read(self, key: str, entry: _Entry) -> torch.Tensor:
        try:
            size = entry.path.stat().st_size
        except OSError as e:
            raise StatsStoreError(f"statistics {key!r} vanished from {self._where()}: {e}") from e
        if size != entry.nbytes:
            raise StatsStoreError(f"statistics file {entry.path} for {key!r} has {size} bytes, expected "
                                  f"{entry.nbytes}")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        raw = torch.from_file(str(entry.path), shared=False, size=entry.nbytes, dtype=torch.uint8)
        return raw.view(entry.dtype).reshape(entry.shape)

    def release(self, key: str) -> None:
        """Forget ``key`` (deleting its files); unknown keys are ignored."""
        entry = self._items.pop(key, None)
        if entry is not None:
            self.used_bytes -= entry.nbytes
            self._drop(entry)

    def _drop(self, entry: _Entry, keep_files: bool = False) -> None:
        entry.tensor = None
        if entry.path is not None and not keep_files:
            for p in (entry.meta, entry.path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    def clear(self) -> None:
        for k in list(self._items):
            self.release(k)

    def __enter__(self) -> "StatsStore":
        return self

    def __exit__(self, *exc) -> None:
        self.clear()

    @staticmethod
    def load_directory(directory: str | os.PathLike) -> "StatsStore":
        """Reopen the committed statistics of a disk store (after a restart); temporary files are ignored."""
        store = StatsStore("disk", directory)
        for meta in sorted(Path(directory).glob("*.json")):
            info = json.loads(meta.read_text())
            if info.get("format") != 1 or info.get("mode") not in (*MODES, RAW):
                continue
            path = meta.with_name(meta.name[:-len(".json")] + ".stats")
            dt = getattr(torch, info["dtype"])
            store._items[info["key"]] = _Entry(info["n"], info["mode"], info["nbytes"], path=path, meta=meta,
                                               shape=tuple(info["shape"]), dtype=dt)
            store.used_bytes += info["nbytes"]
        return store
