"""Launch-file emitters: every output is parsed back (DeepSpeed's parser, bash -n, argparse)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from costmodels.errors import MeshplanError
from costmodels.presets import get_preset
from planner import emitters
from planner.emit.bridge import BRIDGE_FILE
from planner.emit.torchtitan import TORCHTITAN_FILE
from planner.planfile import Plan, load_plan, save_plan
from tests.planner import launch_parsers as lp

REPO = Path(__file__).resolve().parents[2]


def tiny_cpu_plan(**layout) -> Plan:
    lay = dict(dp=2, micro_batch_size=2, global_batch_size=8, sharding="zero1")
    lay.update(layout)
    p = Plan(
        model=get_preset("tiny").to_dict(),
        cluster=dict(accelerator="cpu", num_gpus=2, gpus_per_node=2, num_nodes=1),
        layout=lay,
        train=dict(max_steps=40, lr=1e-3, schedule="cosine", warmup_steps=4),
    )
    p.check()
    return p


def big_gpu_plan(**changes) -> Plan:
    layout = dict(tp=8, pp=14, dp=16, cp=1, vpp=3, sharding="zero3", micro_batch_size=1,
                  global_batch_size=448, recompute="full", sequence_parallel=True,
                  schedule="interleaved")
    train = dict(schedule="wsd", max_steps=1000, lr=8e-5, precision="bf16", grad_clip=1.0)
    layout.update(changes.pop("layout", {}))
    train.update(changes.pop("train", {}))
    p = Plan(
        model=get_preset("llama3-70b").with_(layers=84).to_dict(),  # 84 = 14 stages x 3 x 2
        cluster=dict(accelerator="h100-sxm", num_gpus=1792, gpus_per_node=8, num_nodes=224),
        layout=layout, train=train,
    )
    p.check()
    return p


# --------------------------------------------------------------------------- shell


def _bash_n(text: str, tmp_path: Path, name: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("factory", [tiny_cpu_plan, big_gpu_plan])
def test_shell_outputs_pass_bash_n(factory, tmp_path):
    plan = factory()
    _bash_n(emitters.torchrun_script(plan), tmp_path, "t.sh")
    _bash_n(emitters.slurm_script(plan, plan_dir=tmp_path / "dir with space $x"), tmp_path, "s.sh")


def test_bash_n_catches_a_broken_script(tmp_path):
    # The check above is able to fail: a truncated script is rejected.
    text = emitters.torchrun_script(tiny_cpu_plan())
    with pytest.raises(AssertionError):
        _bash_n(text + 'if [ "$X" ]; then\n', tmp_path, "broken.sh")


def test_torchrun_command_single_and_multi_node():
    single = emitters.torchrun_command(tiny_cpu_plan(), "p.yaml", "out")
    assert single[:4] == ["torchrun", "--standalone", "--nnodes", "1"]
    assert single[single.index("--nproc-per-node") + 1] == "2"
    assert single[single.index("-m") + 1 :] == ["planner.cli", "run", "p.yaml", "--out", "out"]
    assert "--rdzv-backend" not in single
    multi = emitters.torchrun_command(big_gpu_plan(), "p.yaml", "out")
    assert multi[multi.index("--nnodes") + 1] == "224"
    assert multi[multi.index("--rdzv-backend") + 1] == "c10d"
    assert multi[multi.index("--rdzv-endpoint") + 1] == "$MASTER_ADDR:$MASTER_PORT"
    assert multi[multi.index("--nproc-per-node") + 1] == "8"
    assert int(multi[multi.index("--max-restarts") + 1]) >= 1
    # Forced single-node form of a multi-node plan, explicit restarts.
    forced = emitters.torchrun_command(big_gpu_plan(), multi_node=False, max_restarts=0)
    assert "--standalone" in forced and forced[forced.index("--max-restarts") + 1] == "0"


def test_torchrun_script_runs_the_command(tmp_path):
    """Execute the generated script with a fake `torchrun` on PATH and check its argv."""
    plan = tiny_cpu_plan()
    paths = emitters.write_launch_files(plan, tmp_path)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "torchrun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (fake_bin / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    script = next(p for p in paths if p.name == emitters.TORCHRUN_FILE)
    r = subprocess.run([str(script)], capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.splitlines()
    assert argv[argv.index("run") + 1] == str(tmp_path.resolve() / "plan.yaml")
    assert argv[argv.index("--out") + 1] == str(tmp_path.resolve() / "run")


def test_slurm_script_fields():
    text = emitters.slurm_script(big_gpu_plan(), plan_dir="/plans/x")
    assert "#SBATCH --nodes=224" in text
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --cpus-per-task=64" in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    words = shlex.split(srun)
    assert words[words.index("--rdzv-endpoint") + 1] == "$MASTER_ADDR:$MASTER_PORT"
    assert words[words.index("--nnodes") + 1] == "$SLURM_NNODES"
    cpu = emitters.slurm_script(tiny_cpu_plan())
    assert "--gpus-per-node" not in cpu and "#SBATCH --cpus-per-task=2" in cpu


# --------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_config_fields_and_batch_consistency():
    plan = tiny_cpu_plan()
    cfg = emitters.deepspeed_config(plan)
    lay = plan.layout
    assert cfg["train_batch_size"] == lay.global_batch_size == 8
    assert (cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * lay.dp
            == cfg["train_batch_size"])
    assert cfg["zero_optimization"]["stage"] == 1
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # cpu accelerator
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]
    sch = cfg["scheduler"]
    assert sch["type"] == "WarmupCosineLR"
    assert sch["params"]["warmup_num_steps"] == 4 and sch["params"]["total_num_steps"] == 40
    assert sch["params"]["cos_min_ratio"] == pytest.approx(0.1)
    big = emitters.deepspeed_config(big_gpu_plan())
    assert big["zero_optimization"]["stage"] == 3 and "scheduler" not in big  # WSD
    assert "torch_adam" not in big["optimizer"]["params"]
    assert big["gradient_accumulation_steps"] == 28  # 448 sequences / (micro 1 x dp 16)
    assert "scheduler" not in emitters.deepspeed_config(plan, include_scheduler=False)
    none = emitters.deepspeed_config(tiny_cpu_plan(sharding="none"))
    assert none["zero_optimization"]["stage"] == 0
    fp16 = big_gpu_plan(train={"precision": "fp16", "schedule": "constant"})
    cfg16 = emitters.deepspeed_config(fp16)
    assert cfg16["fp16"]["enabled"] and not cfg16["bf16"]["enabled"]
    assert cfg16["scheduler"]["type"] == "WarmupLR"


_DS_ENGINE = textwrap.dedent(
    """
    import json, os, sys
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    import deepspeed
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    out = []
    for cfg in json.load(open(sys.argv[1])):
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                    torch.nn.Linear(32, 1))
        eng, opt, _, sched = deepspeed.initialize(model=model, config=cfg,
                                                  model_parameters=model.parameters())
        for _ in range(2 * cfg["gradient_accumulation_steps"]):
            x = torch.randn(cfg["train_micro_batch_size_per_gpu"], 16, dtype=torch.bfloat16)
            loss = eng(x).float().pow(2).mean()
            eng.backward(loss)
            eng.step()
        out.append(dict(steps=eng.global_steps, optimizer=type(opt).__name__,
                        scheduler=type(sched).__name__, zero=eng.zero_optimization_stage()))
    print("RESULT=" + json.dumps(out))
    """
)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed missing")
@pytest.mark.timeout(420)
def test_deepspeed_engine_trains_with_emitted_configs(tmp_path):
    """Beyond parsing: deepspeed.initialize + two optimizer steps per ZeRO stage on CPU."""
    cfgs = []
    for stage in ("none", "zero1", "zero2", "zero3"):
        p = Plan(model=get_preset("tiny").to_dict(),
                 cluster=dict(accelerator="cpu", num_gpus=1, gpus_per_node=1, num_nodes=1),
                 layout=dict(dp=1, micro_batch_size=2, global_batch_size=4, sharding=stage,
                             engine="deepspeed"),
                 train=dict(max_steps=10, warmup_steps=2))
        cfgs.append(emitters.deepspeed_config(p))
    (tmp_path / "cfgs.json").write_text(json.dumps(cfgs))
    (tmp_path / "engine.py").write_text(_DS_ENGINE)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    port = str(30000 + os.getpid() % 1000)
    r = subprocess.run([sys.executable, str(tmp_path / "engine.py"), str(tmp_path / "cfgs.json"),
                        port], capture_output=True, text=True, env=env, timeout=400, cwd=tmp_path)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT=")), None)
    assert line is not None, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads(line[len("RESULT="):])
    assert [x["zero"] for x in res] == [0, 1, 2, 3]
    assert all(x["steps"] == 2 and x["scheduler"] == "WarmupCosineLR" for x in res)


# --------------------------------------------------------------------------- Megatron


def _parse_megatron_file(text: str, world_size: int) -> argparse.Namespace:
    """Megatron-Core's own parse_args + validate_args on the file (tests/planner/launch_parsers)."""
    if not lp.have("megatron.core"):
        pytest.skip("megatron-core is not installed (make setup)")
    return lp.check_megatron(text, world_size)[0]


def test_megatron_args_parse_back():
    plan = big_gpu_plan(layout={"sharding": "zero1"})  # Megatron's FSDP2 path refuses pp > 1
    assert "# not emitted: layout.pp=14" in emitters.megatron_args_text(big_gpu_plan())
    ns = _parse_megatron_file(emitters.megatron_args_text(plan), plan.cluster.num_gpus)
    spec = plan.model_spec()
    lay, tr = plan.layout, plan.train
    assert (ns.tensor_model_parallel_size, ns.pipeline_model_parallel_size,
            ns.context_parallel_size) == (8, 14, 1)
    assert ns.num_layers_per_virtual_pipeline_stage == spec.layers // (lay.pp * lay.vpp) == 2
    assert ns.sequence_parallel and not ns.use_torch_fsdp2 and ns.use_distributed_optimizer
    assert (ns.recompute_granularity, ns.recompute_method) == ("full", "uniform")
    assert (ns.micro_batch_size, ns.global_batch_size) == (1, 448)
    assert (ns.num_layers, ns.hidden_size, ns.ffn_hidden_size) == (84, 8192, 28672)
    assert ns.num_attention_heads == 64 and ns.group_query_attention
    assert ns.num_query_groups == 8 and ns.swiglu and ns.bf16
    assert ns.seq_length == spec.seq_len == ns.max_position_embeddings
    assert ns.lr == tr.lr and ns.min_lr == pytest.approx(tr.resolved_min_lr)
    assert ns.lr_decay_style == "WSD" and ns.lr_wsd_decay_iters == 200
    assert ns.lr_warmup_iters == tr.resolved_warmup_steps and ns.train_iters == 1000
    assert ns.clip_grad == 1.0 and ns.rotary_base == 500000


def test_megatron_args_small_plan_variants():
    ns = _parse_megatron_file(emitters.megatron_args_text(tiny_cpu_plan()), 2)
    assert ns.use_distributed_optimizer and not ns.sequence_parallel  # tp=1: no SP flag
    assert ns.num_layers_per_virtual_pipeline_stage is None
    assert ns.recompute_granularity is None and ns.lr_decay_style == "cosine"
    sel = _parse_megatron_file(emitters.megatron_args_text(
        big_gpu_plan(layout={"recompute": "selective", "sharding": "none"},
                     train={"precision": "fp8"})), 1792)
    assert sel.recompute_granularity == "selective" and sel.recompute_method is None
    assert sel.bf16 and sel.fp8 == "hybrid" and not sel.use_distributed_optimizer


def test_megatron_moe_flags():
    p = Plan(model=get_preset("mixtral-8x7b").to_dict(),
             cluster=dict(accelerator="h100-sxm", num_gpus=64, gpus_per_node=8, num_nodes=8),
             layout=dict(tp=2, pp=4, dp=8, ep=8, micro_batch_size=1, global_batch_size=64,
                         sequence_parallel=True))
    p.check()
    no_sp = p.model_copy(update={"layout": p.layout.model_copy(update={"sequence_parallel": False})})
    assert "# not emitted: layout.sequence_parallel=false" in emitters.megatron_args_text(no_sp)
    ns = _parse_megatron_file(emitters.megatron_args_text(p), 64)
    assert (ns.num_experts, ns.moe_router_topk, ns.expert_model_parallel_size) == (8, 2, 8)
    assert ns.moe_grouped_gemm and ns.moe_token_dispatcher_type == "alltoall"
    assert (ns.moe_ffn_hidden_size, ns.moe_router_score_function) == (14336, "softmax")


def test_megatron_moe_flags_for_shared_experts_dense_layers_and_qwen3_heads():
    ds = get_preset("deepseek-v3-style").with_(layers=8, dense_layers=3)
    p = Plan(model=ds.to_dict(), cluster=dict(accelerator="h100-sxm", num_gpus=16, gpus_per_node=8, num_nodes=2),
             layout=dict(dp=16, ep=16, micro_batch_size=1, global_batch_size=16),
             train=dict(moe_force_balance=True, moe_z_loss_coef=1e-3))
    ns = _parse_megatron_file(emitters.megatron_args_text(p), 16)
    assert ns.moe_layer_freq == [0, 0, 0, 1, 1, 1, 1, 1]
    assert ns.moe_shared_expert_intermediate_size == 2048 and ns.moe_router_score_function == "sigmoid"
    assert ns.moe_router_force_load_balancing and ns.moe_z_loss_coeff == 1e-3
    q = Plan(model=get_preset("qwen3-30b-a3b").to_dict(),
             cluster=dict(accelerator="h100-sxm", num_gpus=8, gpus_per_node=8, num_nodes=1),
             layout=dict(dp=8, ep=8, micro_batch_size=1, global_batch_size=8))
    nq = _parse_megatron_file(emitters.megatron_args_text(q), 8)
    assert nq.qk_layernorm and nq.kv_channels == 128 and nq.num_experts == 128


# --------------------------------------------------------------------------- writing


def test_write_launch_files(tmp_path):
    plan = tiny_cpu_plan()
    save_plan(plan, tmp_path)
    paths = emitters.write_launch_files(plan, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted([emitters.TORCHRUN_FILE, emitters.DEEPSPEED_FILE,
                            emitters.MEGATRON_FILE, emitters.SLURM_FILE, TORCHTITAN_FILE,
                            BRIDGE_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "plan.yaml"])  # no temps
    for p in paths:
        executable = os.access(p, os.X_OK)
        assert executable == p.name.endswith((".sh", ".sbatch"))
    assert json.loads((tmp_path / emitters.DEEPSPEED_FILE).read_text()) == (
        emitters.deepspeed_config(plan))
    # The plan next to them still round-trips.
    assert load_plan(tmp_path) == plan
    # Rewriting replaces in place.
    emitters.write_launch_files(plan, tmp_path)
    assert len(list(tmp_path.iterdir())) == 7
    (tmp_path / "afile").write_text("x")
    with pytest.raises(MeshplanError, match="not a directory"):
        emitters.write_launch_files(plan, tmp_path / "afile")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash missing")
def test_written_shell_files_pass_bash_n(tmp_path):
    for p in emitters.write_launch_files(big_gpu_plan(), tmp_path):
        if p.suffix in (".sh", ".sbatch"):
            r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, (p.name, r.stderr)
