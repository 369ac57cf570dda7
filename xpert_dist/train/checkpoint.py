"""Checkpoint and resume a run: model weights (base, as pruned, and LoRA), optimizer, pruner state
(masks, EMA scores), schedule position, loss history and RNG states.

Written atomically with checksums (``launch.checkpoint_io``); a resumed run continues exactly where
the checkpoint was taken, so a preempted-and-requeued job ends with the same masks as an
uninterrupted one. The data order is a pure function of (seed, epoch), so it needs no state.
"""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from ..config import RunConfig
from ..distributed.context import DistContext
from ..errors import ConfigError
from ..launch import checkpoint_io, signals

log = logging.getLogger(__name__)


def periodic_due(cfg: RunConfig, step: int, total: int) -> bool:
    every = cfg.train.checkpoint_every
    return every > 0 and step % every == 0 and step < total


def _model_state(model, ctx: DistContext) -> dict[str, torch.Tensor]:
    sd = {}
    for name, p in model.named_parameters():
        with ctx.gather([p]):
            sd[name] = p.detach().clone().cpu().contiguous()
    return sd


RESUME_SECTIONS = ("model", "lora", "data", "prune", "train")


def _resume_relevant(cfg: RunConfig) -> dict:
    """The parts of the config a checkpoint's state depends on (evaluation and paths may change)."""
    d = cfg.to_dict()
    return {k: d[k] for k in RESUME_SECTIONS}


def _check_same_config(path: Path, saved: dict | None, cfg: RunConfig) -> None:
    """Refuse a checkpoint written by another config. A field the checkpoint does not know (added to the
    code since it was written) is accepted when it holds its default: the checkpoint's run behaved so."""
    if saved is None:
        return
    now, defaults = _resume_relevant(cfg), _resume_relevant(RunConfig())
    diff = sorted(f"{sec}.{k}" for sec in RESUME_SECTIONS for k in set(now[sec]) | set(saved.get(sec, {}))
                  if now[sec].get(k) != saved.get(sec, {}).get(k, defaults[sec].get(k)))
    if diff:
        raise ConfigError(f"checkpoint {path} was written by a different run config ({', '.join(diff)}); "
                          f"resume with the same config, or use a new output_dir")


def save(out: Path, step: int, model, engine, pruner, ctx: DistContext, history: list,
         *, cfg: RunConfig, stop: bool = False) -> Path:
    """Write a checkpoint; with ``stop`` (a synchronised stop request) raise Preempted afterwards."""
    from safetensors.torch import save_file

    root = Path(out) / "checkpoints"
    sd = _model_state(model, ctx)

    def writer(tmp: Path) -> None:
        if ctx.rank == 0:
            save_file(sd, str(tmp / "model.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "loss_history": history,
                                                          "config": _resume_relevant(cfg)}))
            torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / "rng.pt")
        torch.save(pruner.state_dict(), tmp / f"pruner-rank{ctx.rank}.pt")
        if engine.deepspeed:
            engine.engine.save_checkpoint(str(tmp / "ds"), tag="state")
        elif ctx.rank == 0:
            torch.save(engine.optimizer_state(), tmp / "optimizer.pt")

    final = root / f"step-{step:08d}"
    multi = ctx.world_size > 1
    checkpoint_io.write_atomic_dir(final, writer, barrier=ctx.barrier if multi else None, is_main=ctx.rank == 0)
    if ctx.rank == 0:
        checkpoint_io.prune_old(root, keep=2)
        log.info("checkpoint %s written", final)
    if stop:
        raise signals.Preempted(f"stopped after step {step}; checkpoint {final}")
    return final


def resume(out: Path, model, engine, pruner, ctx: DistContext, cfg: RunConfig) -> dict:
    """Load the newest complete checkpoint under ``out/checkpoints`` if any; returns trainer state."""
    from safetensors.torch import load_file

    root = Path(out) / "checkpoints"
    path = checkpoint_io.latest_complete(root, verify=True) if ctx.rank == 0 else None
    path = ctx.broadcast_object(str(path) if path else None)
    if path is None:
        return {}
    path = Path(path)
    state = json.loads((path / "trainer.json").read_text())
    _check_same_config(path, state.get("config"), cfg)
    log.info("resuming from %s", path)
    if engine.deepspeed:
        engine.engine.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=False)
    sd = load_file(str(path / "model.safetensors"))
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(sd))
    if missing:
        raise checkpoint_io.CheckpointError(f"checkpoint {path} lacks parameters {missing[:3]}")
    trainable = []
    for name, p in params.items():
        with ctx.gather([p], modify=True):
            ctx.write_frozen(p, sd[name])
        if p.requires_grad:
            trainable.append((p, sd[name]))
    for p, value in trainable:
        ctx.write_trainable(p, value)
    if not engine.deepspeed:
        engine.load_optimizer_state(torch.load(path / "optimizer.pt", weights_only=False))
    own = path / f"pruner-rank{ctx.rank}.pt"
    pruner.load_state_dict(torch.load(own if own.exists() else path / "pruner-rank0.pt", weights_only=False))
    rng = torch.load(path / "rng.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    engine.steps_done = state["step"]
    return state
