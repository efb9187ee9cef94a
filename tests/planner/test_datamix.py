"""Data sizing: tokens from raw size, mixtures, epochs and repeat warnings."""

from __future__ import annotations

import pytest

from costmodels.errors import MeshplanError
from planner import datamix


def test_default_ratios_and_tokens_from_bytes():
    en = datamix.default_ratio("en")
    assert en.chars_per_token == 4.0 and en.bytes_per_char == 1.0
    assert datamix.tokens_from_bytes(10e12, en) == pytest.approx(2.5e12)
    code = datamix.default_ratio("code")
    assert datamix.tokens_from_bytes(3.5e9, code) == pytest.approx(1e9)
    ko = datamix.default_ratio("Korean")
    assert ko.chars_per_token == 2.0
    assert datamix.tokens_from_bytes(6e9, ko) == pytest.approx(1e9)  # 3 bytes/char x 2 chars
    with pytest.raises(MeshplanError, match="--language"):
        datamix.default_ratio("klingon")


@pytest.mark.parametrize(
    "text,value",
    [("10TB", 1e13), ("2TiB", 2 * 2**40), ("500GB", 5e11), ("1.5 GB", 1.5e9), ("2048", 2048.0),
     ("4k", 4000.0)],
)
def test_parse_size_bytes(text, value):
    assert datamix.parse_size_bytes(text) == value


@pytest.mark.parametrize("text", ["ten", "-1TB", "0", "5XB"])
def test_parse_size_bytes_rejects(text):
    with pytest.raises(MeshplanError, match="--data-size"):
        datamix.parse_size_bytes(text)


def _train_tokenizer(path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.save(str(path))
    return tok


def test_measure_sample_with_a_local_tokenizer(tmp_path):
    lines = [f"the quick brown fox {i} jumps over the lazy dog number {i * 7}\n" for i in range(400)]
    tok = _train_tokenizer(tmp_path / "tokenizer.json", lines)
    sample = tmp_path / "sample.txt"
    sample.write_text("".join(lines) + "한국어 문장도 조금 있습니다.\n", encoding="utf-8")
    r = datamix.measure_sample(sample, tmp_path / "tokenizer.json")
    text = sample.read_text(encoding="utf-8")
    expected_tokens = sum(len(tok.encode(line, add_special_tokens=False).ids)
                          for line in text.splitlines(keepends=True))
    assert r.sample_chars == len(text)
    assert r.sample_tokens == expected_tokens  # chunking does not change the count here
    assert r.chars_per_token == pytest.approx(len(text) / expected_tokens)
    assert r.bytes_per_char == pytest.approx(len(text.encode("utf-8")) / len(text))
    assert r.bytes_per_char > 1.0  # the Hangul line weighs 3 bytes per syllable
    assert datamix.tokens_from_bytes(1e6, r) == pytest.approx(1e6 / r.bytes_per_token)


def test_measure_sample_errors(tmp_path):
    with pytest.raises(MeshplanError, match="--sample"):
        datamix.measure_sample(tmp_path / "missing.txt", tmp_path / "tok.json")
    (tmp_path / "s.txt").write_text("hello")
    with pytest.raises(MeshplanError, match="--tokenizer"):
        datamix.measure_sample(tmp_path / "s.txt", tmp_path / "tok.json")
    (tmp_path / "tok.json").write_text("{not json")
    with pytest.raises(MeshplanError, match="not a tokenizers JSON"):
        datamix.measure_sample(tmp_path / "s.txt", tmp_path / "tok.json")


def test_parse_mixture_normalises():
    w = datamix.parse_mixture("web=45,code=17,wiki+books=20,academic=8,other=10")
    assert w == pytest.approx({"web": 0.45, "code": 0.17, "wiki+books": 0.20,
                               "academic": 0.08, "other": 0.10})
    assert datamix.parse_mixture("a=1,b=3") == pytest.approx({"a": 0.25, "b": 0.75})
    for bad in ("web", "web=x", "web=-1", "a=0,b=0", "a=1,a=2", "=3"):
        with pytest.raises(MeshplanError, match="--mixture"):
            datamix.parse_mixture(bad)
    assert datamix.parse_available("code=200B,web=5T") == {"code": 200e9, "web": 5e12}


def test_plan_mixture_tokens_epochs_and_warnings():
    w = datamix.parse_mixture("web=45,code=17,wiki=20,academic=8,other=10")
    avail = {"code": 1e12, "academic": 0.3e12}
    m = datamix.plan_mixture(15e12, w, avail)
    by = {d.domain: d for d in m.domains}
    assert sum(d.tokens for d in m.domains) == pytest.approx(15e12)
    assert by["code"].tokens == pytest.approx(2.55e12)
    assert by["code"].epochs == pytest.approx(2.55)
    assert by["code"].warning is None
    assert by["academic"].epochs == pytest.approx(4.0)  # exactly at the threshold: no warning
    assert by["academic"].warning is None
    assert by["web"].epochs is None
    m2 = datamix.plan_mixture(16e12, w, avail)
    assert [d.domain for d in m2.domains if d.warning] == ["academic"]
    assert "academic" in m2.warnings[0] and "4" in m2.warnings[0]
    assert m.max_tokens_within_threshold == pytest.approx(0.3e12 * 4 / 0.08)
    strict = datamix.plan_mixture(15e12, w, avail, max_epochs=2)
    assert {d.domain for d in strict.domains if d.warning} == {"code", "academic"}
    with pytest.raises(MeshplanError, match="not in --mixture"):
        datamix.plan_mixture(1e9, w, {"books": 1e9})


def test_continual_plan():
    cp = datamix.plan_continual(
        params=7e9, total_tokens=100e9, new_mixture={"ko": 1.0}, replay_fraction=0.1,
        old_mixture={"web": 0.7, "code": 0.3}, new_available={"ko": 30e9},
        old_available={"web": 1e12},
    )
    assert cp.new_tokens == pytest.approx(90e9)
    assert cp.replay_tokens == pytest.approx(10e9)
    assert cp.new.domains[0].epochs == pytest.approx(3.0)
    assert cp.replay.domains[0].epochs == pytest.approx(7e9 / 1e12)
    assert cp.new_flops == pytest.approx(6 * 7e9 * 90e9)
    assert cp.total_flops == pytest.approx(6 * 7e9 * 100e9)
    assert cp.to_dict()["warnings"] == []
    heavy = datamix.plan_continual(7e9, 200e9, {"ko": 1.0}, 0.0, {}, {"ko": 30e9})
    assert heavy.replay_tokens == 0 and len(heavy.warnings) == 1
    with pytest.raises(MeshplanError, match="replay"):
        datamix.plan_continual(7e9, 1e9, {"ko": 1.0}, 1.0, {"web": 1.0})
