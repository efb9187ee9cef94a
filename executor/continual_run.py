"""Continual pretraining inside a run (`plan.continual`): the source checkpoint and its
checks, the held-out loader per domain, the start of a fresh continual run (weights or a
WSD branch's whole state, the EWC Fisher, the initial held-out losses) and its resume.
The pieces that need no trainer (`InitSource`, `EWC`, replay mixtures) are in
`executor.continual`."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from costmodels.errors import MeshplanError
from executor.checkpoint import restore_rng_state
from executor.continual import (
    EWC,
    InitSource,
    check_architecture,
    check_tokenizer,
    load_weights,
    resolve_init,
    soft_differences,
    source_state_dict,
)
from executor.data.batch import Batch
from executor.data.loader import PackedLoader
from executor.evaluation import domain_eval_losses
from executor.run_state import TrainState

if TYPE_CHECKING:
    from executor.train import Trainer

CONTINUAL_DIR = "continual"  # RUN/continual/: EWC state and the initial per-domain losses


def continual_source(t: Trainer) -> tuple[InitSource, dict[str, float]]:
    """The checkpoint `continual.init_from` names, checked against the plan's model and
    tokenizer, and the old domains' mixture replay draws from."""
    cont = t.plan.continual
    src = resolve_init(cont.init_from, cont.branch_step)
    check_architecture(src, t.spec)
    check_tokenizer(src, t._tokenizer_sha256())
    for message in soft_differences(src, t.spec):
        t._warn(message)
    old = dict(cont.replay_mixture or src.mixture)
    check_domains(t, old, "continual.replay_mixture")
    return src, old


def check_domains(t: Trainer, mixture: dict[str, float], where: str) -> None:
    """Every domain of `mixture` is in the run's dataset."""
    missing = sorted(set(mixture) - set(t.dataset.domains))
    if missing:
        raise MeshplanError(
            f"{where}: domain(s) {', '.join(missing)} not in the dataset at "
            f"{t.dataset.directory} (has {', '.join(sorted(t.dataset.domains))})"
        )


def check_branch_source(t: Trainer, src: InitSource) -> None:
    """The checkpoint itself must come from the stable phase of a WSD run: its recorded
    schedule is wsd and the LR of its last update is the peak (not warmup or decay)."""
    rec = src.extra.get("schedule") or {}
    if not rec:
        return  # an older checkpoint without the record: the plan-based check remains
    lr, peak = float(rec.get("lr", 0.0)), float(t.plan.train.lr)
    if rec.get("kind") != "wsd":
        raise MeshplanError(f"continual.branch_step: {src.path} comes from a "
                            f"{rec.get('kind')!r} run; branching needs a wsd run")
    if not math.isclose(lr, peak, rel_tol=1e-9):
        raise MeshplanError(
            f"continual.branch_step={src.step}: the source run's LR there was {lr:.3g}, not "
            f"its stable peak train.lr={peak:.3g}; branch from a stable-phase checkpoint"
        )


def domain_eval_loaders(t: Trainer) -> dict[str, PackedLoader]:
    """One held-out loader per evaluated domain (logged as eval_loss_<domain>)."""
    train, data = t.plan.train, t.plan.data
    if not (train.eval_every and data.heldout_docs):
        return {}
    explicit = bool(train.eval_domains)
    if explicit:
        check_domains(t, dict.fromkeys(train.eval_domains, 1.0), "train.eval_domains")
    out: dict[str, PackedLoader] = {}
    for name in train.eval_domains or sorted(t.dataset.domains):
        try:
            out[name] = PackedLoader(t.dataset, replace(t.loader_cfg,
                                                           mixture={name: 1.0}), "eval")
        except MeshplanError:
            if explicit or name in t.mixture:
                raise
    return out


def initialize_continual(t: Trainer) -> None:
    """A fresh continual run: weights (or, for a WSD branch, the whole training state)
    from `continual.init_from`, then the EWC Fisher and the initial held-out losses."""
    src = t.init_source
    assert src is not None
    cont = t.plan.continual
    if cont.branch_step is not None:
        extra = t.strategy.load_checkpoint(src.path)
        t.state = TrainState.from_json(extra["train"])
        t.detector.load_state_dict(extra["detector"])
        restore_rng_state(extra["rng"])
    elif not t._weights_loaded:
        model = t.strategy.model
        assert model is not None
        load_weights(model, source_state_dict(src), str(src.path))
    if cont.ewc_lambda > 0:
        t.ewc = estimate_ewc(t)
        if t.strategy.rank == 0:
            t.ewc.save(t.run_dir / CONTINUAL_DIR / "ewc.pt")
    t.init_eval = domain_eval_losses(t)
    if t.is_main:
        from planner.atomic import atomic_write_text

        atomic_write_text(t.run_dir / CONTINUAL_DIR / "init.json", json.dumps({
            "init_from": str(src.path), "kind": src.kind, "step": src.step,
            "eval_losses": t.init_eval, "mixture": t.mixture,
            "old_mixture": t.old_mixture,
        }, indent=2))
    t.events.write({"event": "init_from", "path": str(src.path), "kind": src.kind,
                       "source_step": src.step, "step": t.state.step,
                       "branch": cont.branch_step is not None,
                       "eval_losses": t.init_eval})
    t.reporter.info(f"initialised from {src.path} ({src.kind}"
                       + (f", step {src.step})" if src.step is not None else ")"))


def estimate_ewc(t: Trainer) -> EWC:
    """The Fisher information of the old domains at the starting weights."""
    cont = t.plan.continual
    if not t.old_mixture:
        raise MeshplanError("continual.ewc_lambda: EWC needs the old domains' mixture; set "
                            "continual.replay_mixture (e.g. {english: 1.0})")
    cfg = replace(t.loader_cfg, mixture=dict(t.old_mixture),
                  seed=t.loader_cfg.seed + 1)
    old = PackedLoader(t.dataset, cfg, "train")
    model = t.strategy.model
    assert model is not None

    def loss_fn(b: Batch) -> torch.Tensor:
        return t.strategy._micro_loss_sum(b) / max(1, b.num_targets())

    cursor = 0
    batches = []
    for _ in range(cont.ewc_fisher_batches):
        batch, cursor = old.global_batch(cursor)
        batches.append(batch)
    return EWC.estimate(model, cont.ewc_lambda, batches, loss_fn)


def load_continual_state(t: Trainer) -> None:
    """On resume of a continual run: its EWC anchor/Fisher and initial losses."""
    cont = t.plan.continual
    if cont.ewc_lambda > 0:
        path = t.run_dir / CONTINUAL_DIR / "ewc.pt"
        if not path.is_file():
            raise MeshplanError(f"{path}: missing; this continual run cannot resume its EWC "
                                "penalty; start over in a new --out")
        t.ewc = EWC.load(path, cont.ewc_lambda)
    init = t.run_dir / CONTINUAL_DIR / "init.json"
    if init.is_file():
        try:
            t.init_eval = dict(json.loads(init.read_text()).get("eval_losses", {}))
        except json.JSONDecodeError:
            t.init_eval = {}

