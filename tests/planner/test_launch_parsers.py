"""Every launch file `meshplan plan` writes, through the real parser of its tool, for 27 plans
(dense, CP, VPP with even and uneven chunks, HSDP, partial / selective / full recompute,
zero-bubble and V schedules, fp8, MoE, a CPU plan, and plans the search picked)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from costmodels.presets import get_preset
from planner.commands.plan import run as plan_run
from planner.emitters import render_launch_files
from planner.planfile import Plan, load_plan
from tests.planner import launch_parsers as lp

pytestmark = [
    pytest.mark.skipif(not lp.have("deepspeed"), reason="deepspeed is not installed (make setup)"),
    pytest.mark.skipif(not lp.have("megatron.core"), reason="megatron-core is not installed (make setup)"),
    pytest.mark.skipif(not lp.have("torchtitan"), reason="torchtitan is not installed (make setup)"),
    pytest.mark.skipif(not lp.have("hydra"), reason="hydra-core is not installed (make setup)"),
]


def _plan(model: str, gpus: int, layout: dict, train: dict | None = None, seq: int | None = None,
          layers: int | None = None, accelerator: str = "h100-sxm") -> Plan:
    spec = get_preset(model)
    if seq:
        spec = spec.with_(seq_len=seq)
    if layers:
        spec = spec.with_(layers=layers)
    per_node = min(8, gpus)
    p = Plan(model=spec.to_dict(),
             cluster=dict(accelerator=accelerator, num_gpus=gpus, gpus_per_node=per_node,
                          num_nodes=max(1, gpus // per_node)),
             layout=layout, train=dict(max_steps=1000, **(train or {})))
    p.check()
    return p


def _lay(**kw) -> dict:
    base = dict(tp=1, pp=1, dp=1, cp=1, micro_batch_size=1, sequence_parallel=kw.get("tp", 1) > 1)
    base.update(kw)
    return base


CONSTRUCTED = {
    "8b-ddp": ("llama3-8b", 8, _lay(dp=8, global_batch_size=64)),
    "8b-zero1": ("llama3-8b", 16, _lay(dp=16, sharding="zero1", global_batch_size=128)),
    "8b-zero2": ("llama3-8b", 16, _lay(dp=16, sharding="zero2", global_batch_size=64, micro_batch_size=2)),
    "8b-hsdp-zero3": ("llama3-8b", 64, _lay(dp=64, sharding="zero3", dp_shard=8, global_batch_size=256)),
    "8b-hsdp-zero2": ("llama3-8b", 64, _lay(dp=64, sharding="zero2", dp_shard=16, global_batch_size=256)),
    "8b-cp4": ("llama3-8b", 32, _lay(tp=2, cp=4, dp=4, sharding="zero3", global_batch_size=32), None, 32768),
    "8b-tp4-cp2-zero3": ("llama3-8b", 64, _lay(tp=4, cp=2, dp=8, sharding="zero3", global_batch_size=64), None, 16384),
    "70b-vpp": ("llama3-70b", 256, _lay(tp=8, pp=4, vpp=5, dp=8, sharding="zero2", global_batch_size=256,
                                       schedule="interleaved")),
    "70b-vpp-uneven": ("llama3-70b", 192, _lay(tp=8, pp=3, vpp=3, dp=8, sharding="zero2",
                                              global_batch_size=192, schedule="interleaved")),
    "70b-pp-full-recompute": ("llama3-70b", 128, _lay(tp=8, pp=4, dp=4, recompute="full",
                                                     global_batch_size=128)),
    "70b-pp-partial-recompute": ("llama3-70b", 128, _lay(tp=8, pp=4, dp=4, sharding="zero1", recompute="full",
                                                        recompute_layers=8, global_batch_size=128)),
    "70b-selective": ("llama3-70b", 128, _lay(tp=8, pp=2, dp=8, sharding="zero2", recompute="selective",
                                             global_batch_size=128)),
    "70b-gpipe": ("llama3-70b", 64, _lay(tp=8, pp=2, dp=4, global_batch_size=32,
                                        schedule="gpipe")),
    "70b-zbv": ("llama3-70b", 128, _lay(tp=8, pp=4, dp=4, global_batch_size=64, schedule="zbv")),
    "70b-dualpipev": ("llama3-70b", 128, _lay(tp=8, pp=4, dp=4, sharding="zero2", global_batch_size=64,
                                             schedule="dualpipev")),
    "70b-interleaved-zb": ("llama3-70b", 128, _lay(tp=8, pp=4, vpp=2, dp=4,
                                                  global_batch_size=64, schedule="interleaved_zb")),
    "70b-zbh1": ("llama3-70b", 128, _lay(tp=8, pp=4, dp=4, sharding="zero1", global_batch_size=64,
                                        schedule="zbh1")),
    "70b-fp8-wsd": ("llama3-70b", 64, _lay(tp=8, dp=8, sharding="zero3", global_batch_size=64),
                    dict(precision="fp8", schedule="wsd")),
    "405b-4d": ("llama3-405b", 2048, _lay(tp=8, pp=8, vpp=2, cp=2, dp=16, sharding="zero2",
                                         recompute="full", global_batch_size=512,
                                         schedule="interleaved"), dict(schedule="constant"), 16384),
    "8b-pp2-zero2": ("llama3-8b", 32, _lay(tp=2, pp=2, dp=8, sharding="zero2", micro_batch_size=2,
                                          global_batch_size=64)),
    "70b-pp2-mbs2": ("llama3-70b", 64, _lay(tp=8, pp=2, dp=4, sharding="zero2", micro_batch_size=2,
                                           global_batch_size=64, recompute="selective")),
    "405b-pp-zero3": ("llama3-405b", 1024, _lay(tp=8, pp=16, dp=8, sharding="zero3", global_batch_size=256,
                                               recompute="full")),
    "mixtral-ep": ("mixtral-8x7b", 64, _lay(tp=2, ep=8, dp=32, sharding="zero1", global_batch_size=256)),
}


def _constructed(name: str) -> Plan:
    model, gpus, layout, *rest = CONSTRUCTED[name]
    train = rest[0] if rest else None
    seq = rest[1] if len(rest) > 1 else None
    return _plan(model, gpus, layout, train, seq)


SEARCHED = {  # plans the search itself picked (`meshplan plan`)
    "search-70b-512": ["--model", "llama3-70b", "--gpu", "h100-sxm", "--gpus", "512", "--seq-len", "8192",
                       "--global-batch-tokens", "16M"],
    "search-8b-64": ["--model", "llama3-8b", "--gpu", "h100-sxm", "--gpus", "64", "--seq-len", "8192",
                     "--global-batch-tokens", "4M"],
    "search-70b-megatron": ["--model", "llama3-70b", "--gpu", "a100-80gb", "--gpus", "256", "--seq-len",
                            "4096", "--global-batch-tokens", "4M", "--framework", "megatron-core"],
    "search-tiny-cpu": ["--model", "tiny", "--gpu", "cpu", "--gpus", "2", "--seq-len", "128",
                        "--global-batch-tokens", "2048"],
}


def _searched(name: str, tmp: Path) -> Plan:
    import argparse

    from planner.cli import build_parser

    out = tmp / name
    args = build_parser().parse_args(["plan", *SEARCHED[name], "--out", str(out)])
    assert isinstance(args, argparse.Namespace)
    plan_run(args)
    return load_plan(out / "plan.yaml")


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> dict[str, Plan]:
    tmp = tmp_path_factory.mktemp("plans")
    out = {name: _constructed(name) for name in CONSTRUCTED}
    out.update({name: _searched(name, tmp) for name in SEARCHED})
    assert len(out) == 27
    return out


def _refusal(text: str) -> str | None:
    lines = [ln for ln in text.splitlines() if ln.startswith("# not emitted: ")]
    return lines[0].removeprefix("# not emitted: ") if lines else None


def test_every_emitted_file_passes_its_tools_parser(plans, tmp_path):
    parsed = {"deepspeed": 0, "megatron": 0, "torchtitan": 0, "bridge": 0, "torchrun": 0, "sbatch": 0}
    refused: dict[str, list[str]] = {k: [] for k in parsed}
    for name, plan in plans.items():
        files = render_launch_files(plan, tmp_path / name)
        lay, world = plan.layout, plan.cluster.num_gpus
        d = tmp_path / name
        d.mkdir()
        for fname, text in files.items():
            (d / fname).write_text(text)

        ds = json.loads(files["deepspeed_config.json"])
        if "not_emitted" in ds:
            refused["deepspeed"].append(name)
        else:
            c = lp.check_deepspeed(ds, lay.dp)
            assert c.train_batch_size == lay.global_batch_size
            assert c.gradient_accumulation_steps == lay.grad_accum
            assert int(c.zero_optimization_stage) == {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3}[lay.sharding]
            parsed["deepspeed"] += 1

        meg = files["megatron_args.txt"]
        if _refusal(meg):
            refused["megatron"].append(name)
        else:
            args, config = lp.check_megatron(meg, world)
            assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                    args.context_parallel_size, args.data_parallel_size) == (lay.tp, lay.pp, lay.cp, lay.dp), name
            assert args.global_batch_size == lay.global_batch_size and args.micro_batch_size == lay.micro_batch_size
            assert config.num_layers == plan.model_spec().layers
            if lay.vpp > 1:
                assert args.virtual_pipeline_model_parallel_size == lay.vpp, name
            assert config.recompute_granularity == (None if lay.recompute == "none" else lay.recompute)
            parsed["megatron"] += 1

        tt = files["torchtitan.toml"]
        if _refusal(tt):
            refused["torchtitan"].append(name)
        else:
            job = lp.check_torchtitan(d / "torchtitan.toml", world)
            par = job.parallelism
            assert par.data_parallel_replicate_degree * par.data_parallel_shard_degree == lay.dp
            assert job.training.global_batch_size == lay.global_batch_size
            if lay.pp > 1:
                stages = par.module_fqns_per_model_part
                layers = [m for part in stages for m in part if m.startswith("layers.")]
                assert layers == [f"layers.{i}" for i in range(plan.model_spec().layers)]
            parsed["torchtitan"] += 1

        br = files["megatron_bridge_overrides.txt"]
        if _refusal(br):
            refused["bridge"].append(name)
            assert _refusal(br) == _refusal(meg)  # Bridge runs Megatron-Core: the same reason
        else:
            kv = dict(lp.check_bridge_overrides(br))
            assert kv["model.tensor_model_parallel_size"] == lay.tp
            assert kv["train.global_batch_size"] == lay.global_batch_size
            parsed["bridge"] += 1

        config, _, cmd_args = lp.check_torchrun(lp.torchrun_argv(files["launch_torchrun.sh"]))
        assert config.nproc_per_node == min(world, plan.cluster.gpus_per_node)
        assert "run" in cmd_args
        parsed["torchrun"] += 1
        lp.check_sbatch(files["launch_slurm.sbatch"])
        for script in ("launch_torchrun.sh", "launch_slurm.sbatch"):
            lp.check_shell(d / script)
        slurm_cfg, _, _ = lp.check_torchrun(lp.torchrun_argv(files["launch_slurm.sbatch"]))
        assert slurm_cfg.max_nodes == 2  # $SLURM_NNODES, read as 2 here
        parsed["sbatch"] += 1
    print("parsed", parsed, "refused", refused)
    for tool, n in parsed.items():
        assert n + len(refused[tool]) == len(plans)
        assert n >= 20, (tool, n, refused[tool])
    # each refusal is one line naming a field
    for tool, names in refused.items():
        for name in names:
            files = render_launch_files(plans[name], tmp_path / name)
            text = {"deepspeed": "deepspeed_config.json", "megatron": "megatron_args.txt",
                    "torchtitan": "torchtitan.toml", "bridge": "megatron_bridge_overrides.txt"}[tool]
            body = files[text]
            reason = json.loads(body)["not_emitted"] if tool == "deepspeed" else _refusal(body)
            assert reason and "\n" not in reason and ("layout." in reason or "model" in reason), (tool, reason)


def test_torchtitan_flavors_match_the_installed_torchtitan():
    """The flavor table equals torchtitan's own llama3_args (read from its source; torchtitan
    sizes the SwiGLU hidden as multiple_of x ceil(multiplier x 2/3 x 4d / multiple_of))."""
    import ast
    import importlib.util

    from planner.emit.torchtitan import FLAVORS

    origin = importlib.util.find_spec("torchtitan").origin
    src = Path(origin).parent / "models" / "llama3" / "__init__.py"
    tree = ast.parse(src.read_text())
    table = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                 and getattr(n.targets[0], "id", "") == "llama3_args")
    flavors = {ast.literal_eval(k): {kw.arg: ast.literal_eval(kw.value) for kw in v.keywords}
               for k, v in zip(table.keys, table.values, strict=True)}
    for f in FLAVORS:
        a = flavors[f.flavor]
        hidden = int(2 * 4 * a["dim"] / 3)
        hidden = int(a.get("ffn_dim_multiplier", 1.0) * hidden)
        m = a.get("multiple_of", 256)
        ffn = m * ((hidden + m - 1) // m)
        assert (a["dim"], a["n_layers"], a["n_heads"], a.get("n_kv_heads", a["n_heads"]), ffn,
                float(a["rope_theta"])) == (f.hidden, f.layers, f.heads, f.kv_heads, f.ffn_hidden,
                                            f.rope_theta)


def test_parsers_reject_a_broken_file(tmp_path):
    """The checks above can fail: each parser rejects a file with one thing wrong."""
    plan = _constructed("70b-vpp")
    files = render_launch_files(plan, tmp_path)
    ds = json.loads(files["deepspeed_config.json"])
    with pytest.raises(AssertionError):
        lp.check_deepspeed({**ds, "train_batch_size": ds["train_batch_size"] + 1}, plan.layout.dp)
    with pytest.raises(Exception, match="zero_optimization|extra|mics"):
        lp.check_deepspeed({**ds, "zero_optimization": {**ds["zero_optimization"], "mics_shard_size": 8}},
                           plan.layout.dp)
    with pytest.raises(BaseException):  # noqa: B017 -- argparse exits, validate_args asserts
        lp.check_megatron(files["megatron_args.txt"], plan.cluster.num_gpus + 8)
    bad = tomllib.loads(files["torchtitan.toml"].split("\n", 4)[-1])
    bad["parallelism"]["tensor_parallel_degree"] = 3
    import tomli_w

    (tmp_path / "bad.toml").write_text(tomli_w.dumps(bad))
    with pytest.raises(Exception):  # noqa: B017 -- ParallelDims' world-size assertion
        lp.check_torchtitan(tmp_path / "bad.toml", plan.cluster.num_gpus)
    with pytest.raises(AssertionError, match="has no field"):
        lp.check_bridge_overrides("model.tensor_parallel_size=8\n")
    with pytest.raises(AssertionError, match="unknown sbatch option"):
        lp.check_sbatch("#!/bin/bash\n#SBATCH --gpu-per-node=8\n")
    with pytest.raises(AssertionError, match="after the first command"):
        lp.check_sbatch("#!/bin/bash\nset -e\n#SBATCH --nodes=2\n")
