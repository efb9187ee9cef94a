"""The training loop: plan in, checkpoints / metrics.jsonl / summary.json out.

Every step: the global batch for the data cursor (deterministic in seed and sample ids),
this rank's rows split into micro-batches, forward/backward through the strategy, the
global gradient norm, the stability decision (skip / roll back), the scheduled LR, the
optimizer update. A run directory resumes from its newest intact checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from costmodels.errors import MeshplanError
from costmodels.lr_schedule import LRSchedule, branch_schedule, continual_schedule
from executor.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from executor.continual import (
    EWC,
    InitSource,
    check_architecture,
    check_tokenizer,
    load_weights,
    replay_mixture,
    resolve_init,
    soft_differences,
    source_state_dict,
)
from executor.data.batch import Batch
from executor.data.loader import LoaderConfig, PackedLoader
from executor.data.prepare import resolve_dataset
from executor.faults import Fault, FaultInjector
from executor.metrics import EventLog, MetricsLog, Reporter
from executor.model import build_model, count_params
from executor.phase_timer import PhaseTimer
from executor.stability import SpikeDetector
from executor.strategy import Strategy, make_strategy

MAX_ROLLBACKS = 5
CONTINUAL_DIR = "continual"  # RUN/continual/: EWC state and the initial per-domain losses


@dataclass
class RunOptions:
    stop_after_steps: int | None = None
    faults: list[Fault] = field(default_factory=list)
    progress: bool = True
    prepare_progress: bool = True
    quiet: bool = False  # no terminal output at all (benchmarks); files are still written


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resume needs."""

    step: int = 0  # optimizer steps completed (skipped ones included)
    tokens: int = 0  # tokens consumed
    cursor: int = 0  # next sample id of the data stream
    blacklist: set[int] = field(default_factory=set)
    rollbacks: int = 0
    skipped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "tokens": self.tokens, "cursor": self.cursor,
            "blacklist": sorted(self.blacklist), "rollbacks": self.rollbacks,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            step=int(d["step"]), tokens=int(d["tokens"]), cursor=int(d["cursor"]),
            blacklist={int(x) for x in d.get("blacklist", [])},
            rollbacks=int(d.get("rollbacks", 0)), skipped=int(d.get("skipped", 0)),
        )


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and exit after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def plan_fingerprint(plan: Any) -> dict[str, Any]:
    """What must not change across a resume (else the run is a different run)."""
    return {
        "model": plan.model, "objective": plan.train.objective, "seed": plan.train.seed,
        "seq_len": int(plan.model["seq_len"]), "global_batch": plan.layout.global_batch_size,
        "mixture": plan.data.mixture,
    }


class Trainer:
    def __init__(self, plan: Any, run_dir: str | Path, options: RunOptions | None = None,
                 strategy: Strategy | None = None) -> None:
        self.plan = plan
        self.run_dir = Path(run_dir)
        self.opts = options or RunOptions()
        self.strategy = strategy or make_strategy(plan)
        self.is_main = self.strategy.is_logging_rank
        if self.strategy.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.run_dir / "events.jsonl", enabled=self.is_main)
        self.reporter = Reporter(enabled=self.is_main and not self.opts.quiet,
                                 show_progress=self.opts.progress)
        train = plan.train
        seed_everything(train.seed)
        # Data: rank 0 prepares (and caches) first; the others then open the same files.
        if self.strategy.rank == 0:
            self.dataset = resolve_dataset(plan, self.run_dir, self.opts.prepare_progress
                                           and self.is_main)
        self.strategy.barrier()
        if self.strategy.rank != 0:
            self.dataset = resolve_dataset(plan, self.run_dir, False)
        self.spec = plan.model_spec()
        cont = plan.continual
        self.init_source: InitSource | None = None
        self.old_mixture: dict[str, float] = {}
        if cont.init_from:
            self.init_source = resolve_init(cont.init_from, cont.branch_step)
            check_architecture(self.init_source, self.spec)
            check_tokenizer(self.init_source, self._tokenizer_sha256())
            for message in soft_differences(self.init_source, self.spec):
                self._warn(message)
            self.old_mixture = dict(cont.replay_mixture or self.init_source.mixture)
            self._check_domains(self.old_mixture, "continual.replay_mixture")
        self.mixture = replay_mixture(dict(plan.data.mixture), self.old_mixture,
                                      cont.replay_fraction)
        self.loader_cfg = LoaderConfig(
            seq_len=self.spec.seq_len, rows=plan.layout.global_batch_size,
            objective=train.objective, seed=train.seed, mixture=dict(self.mixture),
            mlm_probability=train.mlm_probability, fim_rate=train.fim_rate,
            fim_spm_rate=train.fim_spm_rate, heldout_docs=plan.data.heldout_docs,
        )
        self.loader = PackedLoader(self.dataset, self.loader_cfg, "train")
        self.eval_loader = (
            PackedLoader(self.dataset, self.loader_cfg, "eval")
            if train.eval_every and plan.data.heldout_docs else None
        )
        self.domain_eval_loaders = self._domain_eval_loaders()
        model = build_model(self.spec, train.objective, seed=train.seed)
        self.n_params = count_params(model)
        # A fresh continual run loads its weights before the strategy wraps / shards the model
        # (so every layout takes them); a resume gets them from its own checkpoint instead.
        self._weights_loaded = False
        if (self.init_source is not None and cont.branch_step is None
                and not CheckpointManager._step_dirs(self.run_dir / "checkpoints")):
            load_weights(model, source_state_dict(self.init_source), str(self.init_source.path))
            self._weights_loaded = True
        self.strategy.setup(model, plan)
        if cont.branch_step is not None:
            assert cont.decay_steps is not None  # planfile checks it
            self.schedule = branch_schedule(train, cont.branch_step, cont.decay_steps)
            assert self.init_source is not None
            self._check_branch_source(self.init_source)
        elif cont.init_from:
            self.schedule = continual_schedule(train, cont.lr_fraction)
        else:
            self.schedule = LRSchedule.from_train(train)
        self.max_steps = self.schedule.max_steps
        self.ewc: EWC | None = None
        if cont.ewc_lambda > 0 and (self.strategy.world_size != 1
                                    or type(self.strategy) is not Strategy):
            raise MeshplanError("continual.ewc_lambda: EWC runs in the 1-process torch layout "
                                "only; set layout dp/tp/pp/cp=1 and engine=torch, or drop EWC")
        self.init_eval: dict[str, float] = {}
        self.detector = SpikeDetector.from_plan(plan.stability)
        self.faults = FaultInjector(list(self.opts.faults), vocab_size=self.dataset.vocab_size)
        self.ckpt = CheckpointManager(
            self.run_dir / "checkpoints", keep=plan.checkpoint.keep,
            mirror=Path(plan.checkpoint.mirror_dir) if plan.checkpoint.mirror_dir else None,
            warn=self._warn,
        )
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.is_main)
        self.state = TrainState()
        self.resumed_from: int | None = None

    # ------------------------------------------------------------------ continual
    def _tokenizer_sha256(self) -> str | None:
        return self.dataset.meta.get("sha256", {}).get("tokenizer.json")

    def _check_domains(self, mixture: dict[str, float], where: str) -> None:
        missing = sorted(set(mixture) - set(self.dataset.domains))
        if missing:
            raise MeshplanError(
                f"{where}: domain(s) {', '.join(missing)} not in the dataset at "
                f"{self.dataset.directory} (has {', '.join(sorted(self.dataset.domains))})"
            )

    def _check_branch_source(self, src: InitSource) -> None:
        """The checkpoint itself must come from the stable phase of a WSD run: its recorded
        schedule is wsd and the LR of its last update is the peak (not warmup or decay)."""
        rec = src.extra.get("schedule") or {}
        if not rec:
            return  # an older checkpoint without the record: the plan-based check remains
        lr, peak = float(rec.get("lr", 0.0)), float(self.plan.train.lr)
        if rec.get("kind") != "wsd":
            raise MeshplanError(f"continual.branch_step: {src.path} comes from a "
                                f"{rec.get('kind')!r} run; branching needs a wsd run")
        if not math.isclose(lr, peak, rel_tol=1e-9):
            raise MeshplanError(
                f"continual.branch_step={src.step}: the source run's LR there was {lr:.3g}, not "
                f"its stable peak train.lr={peak:.3g}; branch from a stable-phase checkpoint"
            )

    def _domain_eval_loaders(self) -> dict[str, PackedLoader]:
        """One held-out loader per evaluated domain (logged as eval_loss_<domain>)."""
        train, data = self.plan.train, self.plan.data
        if not (train.eval_every and data.heldout_docs):
            return {}
        explicit = bool(train.eval_domains)
        if explicit:
            self._check_domains(dict.fromkeys(train.eval_domains, 1.0), "train.eval_domains")
        out: dict[str, PackedLoader] = {}
        for name in train.eval_domains or sorted(self.dataset.domains):
            try:
                out[name] = PackedLoader(self.dataset, replace(self.loader_cfg,
                                                               mixture={name: 1.0}), "eval")
            except MeshplanError:
                if explicit or name in self.mixture:
                    raise
        return out

    def _continual_dir(self) -> Path:
        return self.run_dir / CONTINUAL_DIR

    def initialize(self) -> None:
        """A fresh continual run: weights (or, for a WSD branch, the whole training state)
        from `continual.init_from`, then the EWC Fisher and the initial held-out losses."""
        src = self.init_source
        assert src is not None
        cont = self.plan.continual
        if cont.branch_step is not None:
            extra = self.strategy.load_checkpoint(src.path)
            self.state = TrainState.from_json(extra["train"])
            self.detector.load_state_dict(extra["detector"])
            restore_rng_state(extra["rng"])
        elif not self._weights_loaded:
            model = self.strategy.model
            assert model is not None
            load_weights(model, source_state_dict(src), str(src.path))
        if cont.ewc_lambda > 0:
            self.ewc = self._estimate_ewc()
            if self.strategy.rank == 0:
                self.ewc.save(self._continual_dir() / "ewc.pt")
        self.init_eval = self.evaluate_domains()
        if self.is_main:
            from planner.atomic import atomic_write_text

            atomic_write_text(self._continual_dir() / "init.json", json.dumps({
                "init_from": str(src.path), "kind": src.kind, "step": src.step,
                "eval_losses": self.init_eval, "mixture": self.mixture,
                "old_mixture": self.old_mixture,
            }, indent=2))
        self.events.write({"event": "init_from", "path": str(src.path), "kind": src.kind,
                           "source_step": src.step, "step": self.state.step,
                           "branch": cont.branch_step is not None,
                           "eval_losses": self.init_eval})
        self.reporter.info(f"initialised from {src.path} ({src.kind}"
                           + (f", step {src.step})" if src.step is not None else ")"))

    def _estimate_ewc(self) -> EWC:
        cont = self.plan.continual
        if not self.old_mixture:
            raise MeshplanError("continual.ewc_lambda: EWC needs the old domains' mixture; set "
                                "continual.replay_mixture (e.g. {english: 1.0})")
        cfg = replace(self.loader_cfg, mixture=dict(self.old_mixture),
                      seed=self.loader_cfg.seed + 1)
        old = PackedLoader(self.dataset, cfg, "train")
        model = self.strategy.model
        assert model is not None

        def loss_fn(b: Batch) -> torch.Tensor:
            return self.strategy._micro_loss_sum(b) / max(1, b.num_targets())

        cursor = 0
        batches = []
        for _ in range(cont.ewc_fisher_batches):
            batch, cursor = old.global_batch(cursor)
            batches.append(batch)
        return EWC.estimate(model, cont.ewc_lambda, batches, loss_fn)

    def _load_continual_state(self) -> None:
        """On resume of a continual run: its EWC anchor/Fisher and initial losses."""
        cont = self.plan.continual
        if cont.ewc_lambda > 0:
            path = self._continual_dir() / "ewc.pt"
            if not path.is_file():
                raise MeshplanError(f"{path}: missing; this continual run cannot resume its EWC "
                                    "penalty; start over in a new --out")
            self.ewc = EWC.load(path, cont.ewc_lambda)
        init = self._continual_dir() / "init.json"
        if init.is_file():
            try:
                self.init_eval = dict(json.loads(init.read_text()).get("eval_losses", {}))
            except json.JSONDecodeError:
                self.init_eval = {}

    # ------------------------------------------------------------------ logging
    def _warn(self, message: str) -> None:
        self.events.write({"event": "warning", "message": message})
        self.reporter.warn(message)

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {
            "train": self.state.to_json(),
            "detector": self.detector.state_dict(),
            "rng": capture_rng_state(),
            "schedule": {"kind": self.schedule.schedule, "step": self.state.step,
                         "lr": self.schedule.at(max(0, self.state.step - 1))},
            "plan": plan_fingerprint(self.plan),
            "rank": self.strategy.rank,
            "data": {"tokenizer_sha256": self._tokenizer_sha256()},
        }

    def save(self, reason: str) -> Path:
        extra = self.extra_state()
        path = self.ckpt.save(
            self.state.step, lambda d: self.strategy.save_checkpoint(d, extra),
            is_writer=self.strategy.rank == 0, barrier=self.strategy.barrier,
        )
        self.events.write({"event": "checkpoint", "step": self.state.step, "reason": reason,
                           "path": str(path)})
        return path

    def restore(self, path: Path) -> None:
        extra = self.strategy.load_checkpoint(path)
        saved = extra.get("plan", {})
        now = plan_fingerprint(self.plan)
        changed = sorted(k for k in now if k in saved and json.dumps(saved[k], sort_keys=True)
                         != json.dumps(now[k], sort_keys=True))
        if changed:
            raise MeshplanError(
                f"{path}: checkpoint was made with a different {', '.join(changed)}; resume "
                "with the original plan or use a new --out"
            )
        self.state = TrainState.from_json(extra["train"])
        self.detector.load_state_dict(extra["detector"])
        restore_rng_state(extra["rng"])

    def try_resume(self) -> None:
        path = self.ckpt.latest_valid()
        if path is None:
            if self.ckpt.candidates():
                raise MeshplanError(
                    f"{self.ckpt.root}: no intact checkpoint to resume from (all fail their "
                    "manifest); delete the folder to start over or use a new --out"
                )
            self.metrics.truncate_after(0)
            return
        self.restore(path)
        self.resumed_from = self.state.step
        self.metrics.truncate_after(self.state.step)
        self.events.write({"event": "resume", "step": self.state.step, "path": str(path)})
        self.reporter.info(f"resumed from {path} (step {self.state.step})")

    # ------------------------------------------------------------------ steps
    def _micro_batches(self, global_batch: Batch) -> list[Batch]:
        local = self.strategy.local_rows(global_batch)
        return local.split(self.plan.layout.micro_batch_size)

    def train_step(self, step: int) -> dict[str, Any]:
        clock = PhaseTimer(getattr(self.strategy, "device", "cpu"))
        clock.mark("start")
        batch, next_cursor = self.loader.global_batch(self.state.cursor, self.state.blacklist)
        batch, faults = self.faults.apply(step, batch)
        targets = batch.num_targets()
        micro = self._micro_batches(batch)
        clock.mark("data_s")
        loss_t = self.strategy.forward_backward(micro, targets)
        loss = float(loss_t)
        ewc_penalty = self.ewc.apply(self.strategy.model) if self.ewc is not None else None
        grad_norm = self.strategy.clip_grad_norm(self.plan.train.grad_clip)
        clock.mark("compute_s")
        decision = self.detector.check(step, loss, grad_norm)
        lr = self.schedule.at(step - 1)
        if decision.skip:
            self.strategy.zero_grad()
        else:
            self.strategy.set_lr(lr)
            self.strategy.optimizer_step()
            self.strategy.zero_grad()
        clock.mark("optimizer_s")
        phases = clock.durations()
        self.state.step = step
        self.state.cursor = next_cursor
        self.state.tokens += batch.num_tokens
        step_time = sum(phases.values())
        rec: dict[str, Any] = {
            "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": self.state.tokens, "step_time_s": step_time,
            "tokens_per_sec": batch.num_tokens / step_time if step_time > 0 else 0.0,
            "skipped": decision.skip, "skip_reason": decision.reason,
            "target_tokens": targets, **phases,
            "sample_ids": batch.sample_ids.tolist(),
            "wall_time": time.time(),
        }
        if faults:
            rec["faults"] = faults
        if ewc_penalty is not None:
            rec["ewc_penalty"] = ewc_penalty
        comm = getattr(self.strategy, "step_comm_metrics", None)
        if comm is not None:  # distributed: measured vs predicted collective bytes
            rec.update(comm())
        idle = getattr(self.strategy, "pipeline_idle", None)
        if idle is not None and (pp := idle()):  # pipelines: measured bubble (idle / step)
            rec.update(pp, pp_bubble_share=pp["pp_idle_s"] / step_time if step_time > 0 else 0.0)
        rec.update(self.strategy.moe_metrics())  # MoE: tokens per expert, imbalance, losses
        if decision.skip:
            self.state.skipped += 1
            self.events.write({
                "event": "skip", "step": step, "reason": decision.reason, "loss": loss,
                "grad_norm": grad_norm, "running_loss": decision.running_loss,
                "consecutive": self.detector.consecutive, "sample_ids": rec["sample_ids"],
            })
        rec["_rollback"] = decision.rollback
        return rec

    def evaluate(self) -> float | None:
        if self.eval_loader is None:
            return None
        ids, _ = self.eval_loader.next_ids(0, rows=self.plan.train.eval_batches
                                           * self.loader_cfg.rows)
        batch = self.eval_loader.batch_from_ids(ids)
        return self.strategy.eval_loss(self._micro_batches_eval(batch), batch.num_targets())

    def evaluate_domains(self) -> dict[str, float]:
        """Held-out loss of each evaluated domain on the same fixed rows every time."""
        out: dict[str, float] = {}
        rows = self.plan.train.eval_batches * self.loader_cfg.rows
        for name, loader in self.domain_eval_loaders.items():
            ids, _ = loader.next_ids(0, rows=rows)
            batch = loader.batch_from_ids(ids)
            out[name] = self.strategy.eval_loss(self._micro_batches_eval(batch),
                                                batch.num_targets())
        return out

    def _micro_batches_eval(self, batch: Batch) -> list[Batch]:
        per_rank = batch.rows // self.strategy.dp_size
        local = batch.select(slice(self.strategy.dp_rank * per_rank,
                                   (self.strategy.dp_rank + 1) * per_rank))
        return local.split(self.plan.layout.micro_batch_size)

    def rollback(self, spike_samples: list[int], streak_start: int) -> bool:
        """Back to the newest intact checkpoint before the streak; blacklist its samples."""
        path = self.ckpt.latest_valid(max_step=streak_start - 1)
        if path is None:
            self.events.write({"event": "rollback_unavailable", "step": self.state.step,
                               "reason": "no checkpoint before the spike streak"})
            self.reporter.warn("spike streak but no earlier checkpoint: continuing")
            self.detector.consecutive = 0
            return False
        if self.state.rollbacks >= MAX_ROLLBACKS:
            raise MeshplanError(
                f"training diverged: {MAX_ROLLBACKS} rollbacks did not stop the loss spikes; "
                "lower train.lr or raise stability.spike_factor"
            )
        keep_blacklist = self.state.blacklist | set(spike_samples)
        rollbacks = self.state.rollbacks + 1
        from_step = self.state.step
        self.restore(path)
        self.state.blacklist |= keep_blacklist
        self.state.rollbacks = rollbacks
        self.detector.consecutive = 0
        self.ckpt.drop_after(self.state.step)
        self.metrics.truncate_after(self.state.step)
        self.events.write({
            "event": "rollback", "from_step": from_step, "to_step": self.state.step,
            "path": str(path), "blacklisted": sorted(set(spike_samples)),
        })
        self.reporter.warn(f"rollback: step {from_step} -> {self.state.step}, "
                           f"{len(set(spike_samples))} samples blacklisted")
        return True

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        self.try_resume()
        if self.init_source is not None:
            if self.resumed_from is None:
                self.initialize()
            else:
                self._load_continual_state()
        train = self.plan.train
        max_steps = self.max_steps
        stop_at = self.opts.stop_after_steps
        every = self.plan.checkpoint.every
        self.events.write({"event": "start", "step": self.state.step, "max_steps": max_steps,
                           "params": self.n_params, "objective": train.objective,
                           "precision": train.precision,
                           "attention_backend": getattr(self.strategy.model,
                                                        "attention_backend", None)})
        interrupted = False
        streak_samples: list[int] = []
        streak_start = 0
        with _StopFlag() as stop, self.reporter.progress(max_steps, self.state.step) as prog:
            while self.state.step < max_steps:
                step = self.state.step + 1
                rec = self.train_step(step)
                rollback = rec.pop("_rollback")
                if rec["skipped"]:
                    if not streak_samples:
                        streak_start = step
                    streak_samples.extend(rec["sample_ids"])
                else:
                    streak_samples, streak_start = [], 0
                if train.eval_every and step % train.eval_every == 0:
                    ev = self.evaluate()
                    if ev is not None:
                        rec["eval_loss"] = ev
                    for name, value in self.evaluate_domains().items():
                        rec[f"eval_loss_{name}"] = value
                self.metrics.write(rec)
                prog.update(step, rec)
                if rollback and self.rollback(streak_samples, streak_start):
                    streak_samples, streak_start = [], 0
                    prog.update(self.state.step, None)
                    continue
                done = self.state.step >= max_steps
                stopping = stop_at is not None and self.state.step >= stop_at
                if done or stopping or stop.requested or (every and step % every == 0):
                    self.save("final" if done else "stop" if (stopping or stop.requested)
                              else "periodic")
                if not done and (stopping or stop.requested):
                    interrupted = True
                    self.events.write({"event": "stop", "step": self.state.step,
                                       "reason": "signal" if stop.requested else
                                       "stop_after_steps"})
                    break
        summary = self.summary(interrupted)
        if self.is_main:
            from planner.atomic import atomic_write_text

            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            self.reporter.final(summary)
        self.events.write({"event": "end", "step": self.state.step, "interrupted": interrupted})
        self.strategy.teardown()
        return summary

    def _block_forwards(self) -> dict[str, int]:
        """Transformer blocks and attention cores this rank executed, recomputations included
        (the measurement that shows recompute ran: full recompute runs each block twice)."""
        calls = [part.block_calls() for part in self.strategy.model_parts() if hasattr(part, "block_calls")]
        return {"blocks": sum(c[0] for c in calls), "attention_cores": sum(c[1] for c in calls)}

    def summary(self, interrupted: bool) -> dict[str, Any]:
        records = self.metrics.read_all() if self.is_main else []
        good = [r for r in records if not r.get("skipped")]
        times = [r["step_time_s"] for r in good[1:]] or [r["step_time_s"] for r in good]
        tokens_per_step = self.loader_cfg.rows * self.loader_cfg.seq_len
        mean_t = float(np.mean(times)) if times else None
        predicted = dict(self.plan.predicted)
        pred_t = predicted.get("step_time_s")
        out: dict[str, Any] = {
            "steps": self.state.step,
            "max_steps": self.max_steps,
            "finished": self.state.step >= self.max_steps,
            "interrupted": interrupted,
            "objective": self.plan.train.objective,
            "precision": self.plan.train.precision,
            "params": self.n_params,
            "tokens": self.state.tokens,
            "first_loss": good[0]["loss"] if good else None,
            "final_loss": good[-1]["loss"] if good else None,
            "min_loss": min(r["loss"] for r in good) if good else None,
            "final_eval_loss": next((r["eval_loss"] for r in reversed(records)
                                     if "eval_loss" in r), None),
            "skipped_steps": sum(1 for r in records if r.get("skipped")),
            "rollbacks": self.state.rollbacks,
            "blacklisted_samples": len(self.state.blacklist),
            "mean_step_time_s": mean_t,
            "median_step_time_s": float(np.median(times)) if times else None,
            "tokens_per_sec": tokens_per_step / mean_t if mean_t else None,
            "peak_memory_bytes": self.strategy.peak_memory_bytes(),
            "world_size": self.strategy.world_size,
            "device": str(getattr(self.strategy, "device", "cpu")),
            "cpu_threads": torch.get_num_threads(),
            "resumed_from": self.resumed_from,
            "predicted": predicted,
            "applied": self.strategy.applied,
            "block_forwards": self._block_forwards(),
        }
        domain_final = {
            k.removeprefix("eval_loss_"): v for r in records for k, v in r.items()
            if k.startswith("eval_loss_")
        }
        if domain_final:
            out["final_eval_losses"] = domain_final
        if self.init_source is not None:
            cont = self.plan.continual
            out["continual"] = {
                "init_from": str(self.init_source.path), "kind": self.init_source.kind,
                "source_step": self.init_source.step,
                "branch_step": cont.branch_step, "decay_steps": cont.decay_steps,
                "mixture": self.mixture, "old_mixture": self.old_mixture,
                "replay_fraction": cont.replay_fraction, "lr_fraction": cont.lr_fraction,
                "peak_lr": self.schedule.lr, "ewc_lambda": cont.ewc_lambda,
                "init_eval_losses": self.init_eval,
                # forgetting (old domains) / adaptation (new): final minus initial loss
                "eval_loss_change": {d: domain_final[d] - v for d, v in self.init_eval.items()
                                     if d in domain_final},
            }
        predict_pipe = getattr(self.strategy, "predicted_pipeline", None)
        shares = [r["pp_bubble_share"] for r in good[2:] if "pp_bubble_share" in r]
        if predict_pipe is not None and shares:
            # measured idle / step (mean over steps after the first two) beside the cost model's
            out["pipeline"] = {
                "schedule": self.strategy.applied.get("schedule"),
                "micro_batches": self.strategy.applied.get("microbatches_per_step"),
                "measured_bubble_share": float(np.mean(shares)),
                "measured_idle_s": float(np.mean([r["pp_idle_s"] for r in good[2:] if "pp_idle_s" in r])),
            }
            try:
                out["pipeline"].update(predict_pipe())
            except MeshplanError as exc:  # e.g. an unreadable machine profile: keep the run's record
                out["pipeline"]["predicted_error"] = str(exc)
        if isinstance(pred_t, int | float) and pred_t > 0 and mean_t:
            out["measured_over_predicted_step_time"] = mean_t / float(pred_t)
        return out


def run_training(plan: Any, run_dir: str | Path, options: RunOptions | None = None,
                 strategy: Strategy | None = None) -> dict[str, Any]:
    """Train `plan` into `run_dir` (resuming if it holds checkpoints); returns the summary."""
    if not math.isfinite(plan.train.lr):
        raise MeshplanError("train.lr: must be finite")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(plan, run_dir, options, strategy).run()
