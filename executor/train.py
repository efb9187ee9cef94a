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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from costmodels.errors import MeshplanError
from costmodels.lr_schedule import LRSchedule, branch_schedule, continual_schedule
from executor.checkpoint import CheckpointManager, capture_rng_state, restore_rng_state
from executor.continual import (
    EWC,
    InitSource,
    load_weights,
    replay_mixture,
    source_state_dict,
)
from executor.continual_run import (
    check_branch_source,
    continual_source,
    domain_eval_loaders,
    initialize_continual,
    load_continual_state,
)
from executor.data.batch import Batch
from executor.data.loader import LoaderConfig, PackedLoader
from executor.data.prepare import resolve_dataset
from executor.evaluation import domain_eval_losses, eval_loss
from executor.faults import Fault, FaultInjector
from executor.host_probe import HostProbe
from executor.metrics import EventLog, MetricsLog, Reporter
from executor.model import build_model, count_params
from executor.phase_timer import PhaseTimer
from executor.run_state import StopFlag, TrainState, seed_everything
from executor.run_summary import run_summary
from executor.stability import SpikeDetector
from executor.strategy import Strategy, make_strategy
from planner.planfile import Plan

MAX_ROLLBACKS = 5


@dataclass
class RunOptions:
    stop_after_steps: int | None = None
    faults: list[Fault] = field(default_factory=list)
    progress: bool = True
    prepare_progress: bool = True
    quiet: bool = False  # no terminal output at all (benchmarks); files are still written


def plan_fingerprint(plan: Plan) -> dict[str, Any]:
    """What must not change across a resume (else the run is a different run)."""
    return {
        "model": plan.model, "objective": plan.train.objective, "seed": plan.train.seed,
        "seq_len": int(plan.model["seq_len"]), "global_batch": plan.layout.global_batch_size,
        "mixture": plan.data.mixture,
    }


class Trainer:
    def __init__(self, plan: Plan, run_dir: str | Path, options: RunOptions | None = None,
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
            self.init_source, self.old_mixture = continual_source(self)
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
        self.domain_eval_loaders = domain_eval_loaders(self)
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
            check_branch_source(self, self.init_source)
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
        self.host_probe = HostProbe() if train.host_probe and self.is_main else None
        self.state = TrainState()
        self.resumed_from: int | None = None

    # ------------------------------------------------------------------ continual
    def _tokenizer_sha256(self) -> str | None:
        return self.dataset.meta.get("sha256", {}).get("tokenizer.json")

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
        faults += self.faults.corrupt_grads(step, self.strategy.parameters())
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
        if self.plan.train.host_probe:  # every rank waits while the logging rank probes
            self.strategy.barrier()
            if self.host_probe is not None:
                rec["host_fp32_tflops"] = self.host_probe.measure()
            self.strategy.barrier()
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
        return eval_loss(self)

    def evaluate_domains(self) -> dict[str, float]:
        return domain_eval_losses(self)

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
                initialize_continual(self)
            else:
                load_continual_state(self)
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
        with StopFlag() as stop, self.reporter.progress(max_steps, self.state.step) as prog:
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

    def summary(self, interrupted: bool) -> dict[str, Any]:
        return run_summary(self, interrupted)


def run_training(plan: Plan, run_dir: str | Path, options: RunOptions | None = None,
                 strategy: Strategy | None = None) -> dict[str, Any]:
    """Train `plan` into `run_dir` (resuming if it holds checkpoints); returns the summary."""
    if not math.isfinite(plan.train.lr):
        raise MeshplanError("train.lr: must be finite")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(plan, run_dir, options, strategy).run()
