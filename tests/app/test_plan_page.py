"""Plan page (AppTest): default render, input changes change the output, user errors are
messages, and the downloads are valid plans."""

from __future__ import annotations

import json

import yaml

from planner.planfile import plan_from_dict


def _table(at):
    return at.table[0].value


def test_default_render_shows_ranked_table_and_charts(page):
    at = page("plan")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    df = _table(at)
    header = " ".join(df.columns)
    assert "tokens/s" in header and "MFU" in header
    assert len(df) == 10
    # Ranked best first by step time.
    steps = df["step s"].astype(float).tolist()
    assert steps == sorted(steps)
    assert len(at.get("plotly_chart")) == 3  # memory bar, waterfall, Pareto front
    names = [b.proto.label for b in at.get("download_button")]
    assert "plan.yaml" in names and "all (zip)" in names and len(names) >= 5


def test_more_gpus_changes_the_table(page):
    at = page("plan")
    before = _table(at)
    at.number_input(key="plan_nodes").set_value(256).run()
    assert not at.exception
    after = _table(at)
    assert "2,048 x h100-sxm" in " ".join(c.value for c in at.caption)
    assert before["DP"].tolist() != after["DP"].tolist()
    assert float(after["step s"].iloc[0]) < float(before["step s"].iloc[0])


def test_top_n_and_selection_redraw(page):
    at = page("plan")
    at.slider(key="plan_top").set_value(4).run()
    assert len(_table(at)) == 4
    first_yaml = at.code[0].value
    at.selectbox(key="plan_selected").set_value(3).run()
    assert not at.exception
    plan = yaml.safe_load(at.code[0].value)
    assert at.code[0].value != first_yaml
    row = _table(at).iloc[3]
    assert plan["layout"]["tp"] == int(row["TP"]) and plan["layout"]["dp"] == int(row["DP"])
    assert plan["layout"]["micro_batch_size"] == int(row["micro"])
    plan_from_dict(plan)  # the downloaded plan.yaml validates as a plan


def test_impossible_batch_is_a_message(page):
    at = page("plan")
    at.number_input(key="plan_gbs").set_value(3).run()
    assert not at.exception
    errors = [e.value for e in at.error]
    assert errors and "global batch" in errors[0]
    assert not at.table  # no stale table under the message


def test_model_that_does_not_fit_is_a_message(page):
    at = page("plan")
    at.selectbox(key="plan_preset").set_value("llama3-405b")
    at.number_input(key="plan_nodes").set_value(1)
    at.selectbox(key="plan_acc").set_value("a100-40gb").run()
    assert not at.exception
    assert any("no layout fits in memory" in e.value for e in at.error)


def test_bad_custom_model_and_fp8_are_messages(page):
    at = page("plan")
    at.radio(key="plan_model_source").set_value("Custom").run()
    assert not at.error and at.table  # the custom defaults (LLaMA-3 8B shape) plan fine
    at.slider(key="plan_heads").set_value(7).run()
    assert not at.exception
    assert any("divisible by heads" in e.value for e in at.error)
    at = page("plan")
    at.selectbox(key="plan_acc").set_value("a100-80gb")
    at.selectbox(key="plan_precision").set_value("fp8").run()
    assert not at.exception
    assert any("FP8" in e.value for e in at.error)


def test_empty_constraints_are_messages(page):
    at = page("plan")
    at.multiselect(key="plan_sharding").set_value([]).run()
    assert any("ZeRO stages" in e.value for e in at.error)
    at = page("plan")
    at.text_input(key="plan_train_tokens").input("lots").run()
    assert any("Training tokens" in e.value for e in at.error)


def test_train_tokens_set_the_plan_steps(page):
    at = page("plan")
    at.text_input(key="plan_train_tokens").input("1T").run()
    plan = yaml.safe_load(at.code[0].value)
    tokens_per_step = 2048 * 8192
    assert plan["train"]["max_steps"] == -(-10**12 // tokens_per_step)
    assert at.session_state["meshplan_plan"]["steps"] == plan["train"]["max_steps"]


def test_main_navigation_opens_plan(page):
    at = page("main")
    assert not at.exception
    assert "tokens/s/GPU" in at.table[0].value.columns


def test_uploaded_hf_config(page):
    at = page("plan")
    at.radio(key="plan_model_source").set_value("HF config.json").run()
    assert any("upload a Hugging Face config.json" in e.value for e in at.error)
    cfg = {"_name_or_path": "my-1b", "hidden_size": 2048, "num_hidden_layers": 16,
           "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
           "vocab_size": 128256, "max_position_embeddings": 8192, "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
    at.file_uploader(key="plan_hf").upload("config.json", json.dumps(cfg).encode(),
                                           "application/json").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert any("my-1b: 1.24 B parameters" in c.value for c in at.caption)
    assert at.table
    at.file_uploader(key="plan_hf").upload("config.json", b"{not json",
                                           "application/json").run()
    assert not at.exception and any("not valid JSON" in e.value for e in at.error)
