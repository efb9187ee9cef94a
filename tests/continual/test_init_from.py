"""init_from: our checkpoints and Hugging Face LLaMA folders, architecture checks, per-domain
held-out losses, replay sampling, EWC resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from costmodels.errors import MeshplanError
from executor.continual import (
    EWC,
    InitSource,
    check_tokenizer,
    load_weights,
    replay_mixture,
    resolve_init,
    source_state_dict,
)
from executor.data.loader import LoaderConfig, PackedLoader
from executor.data.prepare import resolve_dataset
from executor.hf_format import CONFIG_FILE, WEIGHTS_FILE, export_hf, read_hf_tensors
from executor.model import build_model
from executor.train import RunOptions, run_training
from planner.cli import main
from planner.planfile import PlanError
from tests.executor.executor_testlib import MICRO, make_plan, read_metrics, write_plan

QUIET = RunOptions(quiet=True, progress=False)


def code_plan(init_from: Path | str, steps: int = 3, model: dict | None = None, **continual):
    return make_plan(
        model=model,
        train={"max_steps": steps, "lr": 3e-3, "warmup_steps": 2, "eval_every": steps,
               "eval_batches": 1},
        data={"mixture": {"code": 1.0}, "heldout_docs": 16},
        checkpoint={"every": 0},
        continual={"init_from": str(init_from), **continual},
    )


def test_continue_from_our_checkpoint(english_run: Path, tmp_path: Path) -> None:
    source = read_metrics(english_run)
    assert "eval_loss_english" in source[-1] and "eval_loss_code" in source[-1]
    summary = run_training(code_plan(english_run, lr_fraction=0.5), tmp_path / "c", QUIET)
    c = summary["continual"]
    # The initial held-out losses are the source's final ones: the weights loaded exactly.
    assert c["init_eval_losses"]["english"] == source[-1]["eval_loss_english"]
    assert c["init_eval_losses"]["code"] == source[-1]["eval_loss_code"]
    assert c["source_step"] == 30 and c["kind"] == "meshplan"
    assert c["old_mixture"] == {"english": 1.0} and c["mixture"] == {"code": 1.0}
    metrics = read_metrics(tmp_path / "c")
    assert [r["step"] for r in metrics] == [1, 2, 3]  # a fresh step count
    assert metrics[0]["lr"] == pytest.approx(3e-3 * 0.5 / 2)  # re-warmup to lr x fraction
    assert metrics[1]["lr"] == pytest.approx(3e-3 * 0.5)
    assert {"eval_loss_english", "eval_loss_code"} <= set(metrics[-1])
    assert summary["final_eval_losses"]["code"] < c["init_eval_losses"]["code"]
    assert c["eval_loss_change"]["code"] == pytest.approx(
        summary["final_eval_losses"]["code"] - c["init_eval_losses"]["code"])
    events = [json.loads(x) for x in (tmp_path / "c" / "events.jsonl").read_text().splitlines()]
    assert any(e["event"] == "init_from" for e in events)


def test_architecture_mismatch_is_one_line(english_run: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    for field, value in (("hidden", 128), ("layers", 3), ("kv_heads", 4)):
        model = MICRO.with_(**{field: value}).to_dict()
        path = write_plan(tmp_path, code_plan(english_run, model=model))
        assert main(["run", str(path), "--out", str(tmp_path / f"bad-{field}"),
                     "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        have = getattr(MICRO, field)
        assert len(err) == 1
        assert (f"init_from: checkpoint has {field}={have} but the plan's model has "
                f"{field}={value}") in err[0]
        assert not (tmp_path / f"bad-{field}" / "metrics.jsonl").exists()


def test_hf_export_import_is_bit_exact(tmp_path: Path) -> None:
    for spec in (MICRO, MICRO.with_(tied_embeddings=True, bias=True)):
        model = build_model(spec, seed=3)
        out = export_hf(model, spec, tmp_path / f"hf-{spec.tied_embeddings}")
        cfg = json.loads((out / CONFIG_FILE).read_text())
        assert cfg["hidden_size"] == spec.hidden and cfg["num_key_value_heads"] == spec.kv_heads
        names = set(read_hf_tensors(out))
        assert "model.layers.0.self_attn.q_proj.weight" in names
        assert "model.layers.1.mlp.gate_proj.weight" in names
        assert "model.embed_tokens.weight" in names
        assert ("lm_head.weight" in names) is (not spec.tied_embeddings)
        assert ("model.layers.0.self_attn.q_proj.bias" in names) is spec.bias
        src = resolve_init(str(out))
        assert src.kind == "hf" and src.arch["hidden"] == spec.hidden
        fresh = build_model(spec, seed=99)
        load_weights(fresh, source_state_dict(src), str(out))
        want, got = model.state_dict(), fresh.state_dict()
        assert set(want) == set(got)
        for name in want:
            assert torch.equal(want[name], got[name]), name
        if spec.tied_embeddings:
            assert fresh.output.weight is fresh.tok_embeddings.weight
        x = torch.randint(0, spec.vocab, (1, 16))
        pos = torch.arange(16).unsqueeze(0)
        doc = torch.zeros(1, 16, dtype=torch.long)
        assert torch.equal(model(x, pos, doc), fresh(x, pos, doc))


def test_continue_from_hf_folder(english_run: Path, tmp_path: Path) -> None:
    source = read_metrics(english_run)
    ckpt = english_run / "checkpoints" / "step_000030"
    model = build_model(MICRO, seed=0)
    model.load_state_dict(torch.load(ckpt / "model.pt", weights_only=True))
    hf = export_hf(model, MICRO, tmp_path / "hf")
    summary = run_training(code_plan(hf, replay_fraction=0.2,
                                     replay_mixture={"english": 1.0}), tmp_path / "c", QUIET)
    c = summary["continual"]
    assert c["kind"] == "hf"
    assert c["init_eval_losses"]["english"] == source[-1]["eval_loss_english"]
    assert c["mixture"] == pytest.approx({"code": 0.8, "english": 0.2})
    # A config that disagrees with the plan names the field.
    cfg = json.loads((hf / CONFIG_FILE).read_text())
    cfg["intermediate_size"] = 200
    (hf / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(MeshplanError, match=r"checkpoint has ffn_hidden=200 but the plan's "
                                            r"model has ffn_hidden=176"):
        run_training(code_plan(hf), tmp_path / "c2", QUIET)
    # Replay from an HF source needs the old mixture spelled out.
    with pytest.raises(MeshplanError, match="replay_mixture"):
        cfg["intermediate_size"] = 176
        (hf / CONFIG_FILE).write_text(json.dumps(cfg))
        run_training(code_plan(hf, replay_fraction=0.1), tmp_path / "c3", QUIET)


def test_init_from_errors(english_run: Path, tmp_path: Path) -> None:
    with pytest.raises(MeshplanError, match="not found"):
        resolve_init(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MeshplanError, match="neither a meshplan checkpoint"):
        resolve_init(str(tmp_path / "empty"))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / CONFIG_FILE).write_text("{}")
    (tmp_path / "hf" / WEIGHTS_FILE).write_bytes(b"garbage")
    with pytest.raises(MeshplanError, match="missing 'hidden_size'"):
        resolve_init(str(tmp_path / "hf"))
    src = resolve_init(str(english_run / "checkpoints"))
    assert src.step == 30 and src.mixture == {"english": 1.0}
    assert resolve_init(str(english_run / "checkpoints" / "step_000010")).step == 10
    other = InitSource("meshplan", tmp_path, 1, extra={"data": {"tokenizer_sha256": "a"}})
    check_tokenizer(other, "a")
    with pytest.raises(MeshplanError, match="different tokenizer"):
        check_tokenizer(other, "b")
    with pytest.raises(PlanError, match="need continual.init_from"):
        make_plan(continual={"replay_fraction": 0.1})
    with pytest.raises(PlanError, match="decay_steps"):
        make_plan(continual={"init_from": "x", "branch_step": 10})
    with pytest.raises(PlanError, match="only applies to a WSD branch"):
        make_plan(continual={"init_from": "x", "decay_steps": 10})


def test_replay_draws_its_share_of_rows(english_run: Path) -> None:
    mix = replay_mixture({"code": 1.0}, {"english": 3.0, "code": 1.0}, 0.15)
    assert mix == pytest.approx({"code": 0.85 + 0.15 * 0.25, "english": 0.15 * 0.75})
    plan = make_plan(data={"mixture": {"code": 1.0}})
    ds = resolve_dataset(plan, None, progress=False)
    loader = PackedLoader(ds, LoaderConfig(seq_len=64, rows=8, seed=7,
                                           mixture=replay_mixture({"code": 1.0},
                                                                  {"english": 1.0}, 0.15)))
    share = sum(loader.domain_of(i) == "english" for i in range(4000)) / 4000
    assert share == pytest.approx(0.15, abs=0.02)


def test_ewc_penalty_and_resume(english_run: Path, tmp_path: Path) -> None:
    plan = code_plan(english_run, steps=6, ewc_lambda=1e4, ewc_fisher_batches=2)
    full = run_training(plan, tmp_path / "full", QUIET)
    rows = read_metrics(tmp_path / "full")
    assert rows[0]["ewc_penalty"] == 0.0  # at the anchor
    assert all(r["ewc_penalty"] > 0 for r in rows[1:])
    assert (tmp_path / "full" / "continual" / "ewc.pt").is_file()
    # Interrupted at step 3 and resumed: the same losses as the uninterrupted run.
    part = tmp_path / "part"
    run_training(plan, part, RunOptions(quiet=True, progress=False, stop_after_steps=3))
    resumed = run_training(plan, part, QUIET)
    assert resumed["resumed_from"] == 3
    assert [r["loss"] for r in read_metrics(part)] == [r["loss"] for r in rows]
    assert resumed["continual"]["init_eval_losses"] == full["continual"]["init_eval_losses"]


def test_ewc_math() -> None:
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
    ewc = EWC(2.0, {"weight": torch.tensor([[3.0, 0.5]])},
              {"weight": torch.tensor([[0.0, 0.0]])})
    pen = ewc.apply(lin)
    assert pen == pytest.approx(0.5 * 2.0 * (3.0 * 1 + 0.5 * 1))  # lambda/2 sum F d^2
    assert torch.allclose(lin.weight.grad, torch.tensor([[6.0, -1.0]]))  # lambda F d


def test_export_hf_cli(english_run: Path, tmp_path: Path,
                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "hf"
    assert main(["checkpoint", "export-hf", str(english_run), "--out", str(out)]) == 0
    assert "step 30" in capsys.readouterr().out
    ours = torch.load(english_run / "checkpoints" / "step_000030" / "model.pt",
                      weights_only=True)
    back = source_state_dict(resolve_init(str(out)))
    assert set(back) == set(ours)
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    assert main(["checkpoint", "export-hf", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "already a Hugging Face folder" in capsys.readouterr().err


def test_hf_config_variants(tmp_path: Path) -> None:
    from executor.continual import check_architecture, soft_differences
    from executor.hf_format import arch_from_config

    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 8192, "intermediate_size": 176,
            "rms_norm_eps": 1e-5}
    # transformers >= 5 nests the RoPE base in rope_parameters.
    arch = arch_from_config({**base, "rope_parameters": {"rope_theta": 5e5,
                                                         "rope_type": "default"}}, "c")
    assert arch["rope_theta"] == 5e5
    assert arch_from_config({**base, "rope_theta": 1e4}, "c")["rope_theta"] == 1e4
    with pytest.raises(MeshplanError, match="RoPE scaling 'llama3' is not supported"):
        arch_from_config({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "c")
    with pytest.raises(MeshplanError, match="mlp_bias"):
        arch_from_config({**base, "attention_bias": True, "mlp_bias": False}, "c")
    # A different RoPE base is allowed (context extension) but reported.
    src = InitSource("hf", tmp_path, None, arch)
    check_architecture(src, MICRO)
    warnings = soft_differences(src, MICRO)
    assert len(warnings) == 1 and "rope_theta=500000.0" in warnings[0]
    assert soft_differences(InitSource("hf", tmp_path, None, arch_from_config(
        {**base, "rope_theta": MICRO.rope_theta}, "c")), MICRO) == []
