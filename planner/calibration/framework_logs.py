"""Step times (and peak memory where printed) from other frameworks' training logs.

What each trainer prints, and what is read from it:

* Megatron-LM / Megatron-Core (`training.py` `training_log`): `iteration N/ M | ... |
  elapsed time per iteration (ms): T | ...` -> T / 1000 s per step; the memory report
  `memory (MB) | allocated: ... | max allocated: A | ...` -> A MB peak.
* torchtitan (`components/metrics.py`): `step: N  loss: ...  memory: X GiB(P%)  tps: K
  tflops: ...  mfu: ...%` -> step time = tokens per step / (K x GPUs), since torchtitan's
  tps is tokens per second per GPU; X GiB (max reserved) peak.
* DeepSpeed (`utils/timer.py` ThroughputTimer, every `steps_per_print`):
  `epoch=E/micro_step=M/global_step=N, RunningAvgSamplesPerSec=R, CurrSamplesPerSec=C,
  MemAllocated=...GB, MaxMemAllocated=A GB` -> step time = train_batch_size / C (its
  samples are the whole job's), A GB peak.
* NeMo 2 / Megatron-Bridge (Lightning progress and its `train_step_timing` metric):
  `... global_step: N | ... | train_step_timing in s: T` (or `=` instead of `:`) -> T s.

`parse_log(text, framework=None)` returns a `LogSteps`; `framework=None` detects it from
the lines (the format with the most step lines wins).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from costmodels.errors import MeshplanError
from costmodels.stacks import GIB_GB

FRAMEWORKS = ("megatron", "torchtitan", "deepspeed", "nemo")

_NUM = r"([0-9][0-9,]*\.?[0-9]*(?:[eE][-+]?[0-9]+)?)"
_MEGATRON_STEP = re.compile(r"iteration\s+(\d+)\s*/\s*\d+\s*\|.*?elapsed time per iteration \(ms\):\s*" + _NUM)
_MEGATRON_MEM = re.compile(r"memory \(MB\)\s*\|.*?max allocated:\s*" + _NUM)
_MEGATRON_GBS = re.compile(r"global batch size:\s*(\d+)")
_TITAN_STEP = re.compile(r"step:\s*(\d+)\b.*?\btps:\s*" + _NUM)
_TITAN_MEM = re.compile(r"memory:\s*" + _NUM + r"\s*GiB")
_DS_STEP = re.compile(r"global_step=(\d+),.*?CurrSamplesPerSec=" + _NUM)
_DS_MEM = re.compile(r"MaxMemAllocated=" + _NUM + r"\s*GB")
_NEMO_STEP = re.compile(r"train_step_timing in s\s*[:=]\s*" + _NUM)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NEMO_ITER = re.compile(r"(?:global_step|iteration)\s*[:=]?\s*(\d+)")


def _f(text: str) -> float:
    return float(text.replace(",", ""))


@dataclass
class LogSteps:
    """What one log says: the framework, each logged step's wall time, the peak memory."""

    framework: str
    steps: list[int] = field(default_factory=list)
    step_time_s: list[float] = field(default_factory=list)  # wall time per optimizer step
    peak_memory_gb: float | None = None
    global_batch_size: int | None = None  # where the log prints it (Megatron)

    def steady(self, warmup: int) -> list[float]:
        """Step times after the first `warmup` optimizer steps."""
        return [t for s, t in zip(self.steps, self.step_time_s, strict=True) if s > warmup]


def _megatron(lines: list[str], **_: int) -> LogSteps:
    out = LogSteps("megatron")
    for line in lines:
        m = _MEGATRON_STEP.search(line)
        if m:
            out.steps.append(int(m.group(1)))
            out.step_time_s.append(_f(m.group(2)) / 1000)
            g = _MEGATRON_GBS.search(line)
            if g:
                out.global_batch_size = int(g.group(1))
        mem = _MEGATRON_MEM.search(line)
        if mem:
            out.peak_memory_gb = max(out.peak_memory_gb or 0.0, _f(mem.group(1)) / 1000 * 1.048576)
    return out


def _rate_steps(name: str, lines: list[str], step_re: re.Pattern[str], mem_re: re.Pattern[str],
                per_step: float, mem_scale: float) -> LogSteps:
    """A log whose step lines carry a throughput (group 2) rather than a time: the step time
    is `per_step` / rate (1 / rate without it); memory is group 1 of `mem_re` x `mem_scale`."""
    out = LogSteps(name)
    for line in lines:
        m = step_re.search(line)
        if not m:
            continue
        rate = _f(m.group(2))
        if rate <= 0:
            continue
        out.steps.append(int(m.group(1)))
        out.step_time_s.append(per_step / rate if per_step else 1.0 / rate)
        mem = mem_re.search(line)
        if mem:
            out.peak_memory_gb = max(out.peak_memory_gb or 0.0, _f(mem.group(1)) * mem_scale)
    return out


def _torchtitan(lines: list[str], tokens_per_step: int = 0, gpus: int = 0, **_: int) -> LogSteps:
    # tps is per GPU: a step of `tokens_per_step` tokens over `gpus` GPUs
    per_step = tokens_per_step / gpus if tokens_per_step and gpus else 0.0
    return _rate_steps("torchtitan", lines, _TITAN_STEP, _TITAN_MEM, per_step, GIB_GB)


def _deepspeed(lines: list[str], samples_per_step: int = 0, **_: int) -> LogSteps:
    return _rate_steps("deepspeed", lines, _DS_STEP, _DS_MEM, float(samples_per_step), 1.0)


def _nemo(lines: list[str], **_: int) -> LogSteps:
    out = LogSteps("nemo")
    for line in lines:
        m = _NEMO_STEP.search(line)
        if not m:
            continue
        it = _NEMO_ITER.search(line)
        out.steps.append(int(it.group(1)) if it else len(out.steps) + 1)
        out.step_time_s.append(_f(m.group(1)))
    return out


_PARSERS = {"megatron": _megatron, "torchtitan": _torchtitan, "deepspeed": _deepspeed, "nemo": _nemo}


def parse_log(text: str, framework: str | None = None, tokens_per_step: int = 0, gpus: int = 0,
              samples_per_step: int = 0, where: str = "log") -> LogSteps:
    """Parse `text` as `framework`'s log (None: detect it). torchtitan logs need the tokens
    per step and the GPU count, DeepSpeed logs the samples per step, to turn rates into
    step times."""
    lines = _ANSI.sub("", text).splitlines()  # torchtitan colours its metric labels
    kw = {"tokens_per_step": tokens_per_step, "gpus": gpus, "samples_per_step": samples_per_step}
    if framework is not None:
        if framework not in _PARSERS:
            raise MeshplanError(f"--framework {framework}: choose from {', '.join(FRAMEWORKS)}")
        found = _PARSERS[framework](lines, **kw)
    else:
        found = max((p(lines, **kw) for p in _PARSERS.values()), key=lambda r: len(r.steps))
    if not found.steps:
        what = framework or " / ".join(FRAMEWORKS)
        raise MeshplanError(f"{where}: no {what} step lines found (e.g. Megatron's 'elapsed time "
                            "per iteration (ms)', torchtitan's 'tps:'); pass --framework or check the file")
    return found


def read_log(path: str | Path, framework: str | None = None, tokens_per_step: int = 0,
             gpus: int = 0, samples_per_step: int = 0) -> LogSteps:
    p = Path(path)
    if not p.is_file():
        raise MeshplanError(f"--log {p}: file not found")
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise MeshplanError(f"--log {p}: unreadable ({exc.strerror})") from None
    return parse_log(text, framework, tokens_per_step, gpus, samples_per_step, where=f"--log {p}")
