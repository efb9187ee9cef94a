"""Data: ingest, tokenizer, shards, packing, mixture, and the MLM / FIM objectives."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from costmodels.errors import MeshplanError
from executor.data.batch import IGNORE_INDEX
from executor.data.loader import LoaderConfig, PackedLoader
from executor.data.objectives import fim_layout, fim_split, fim_transform, mlm_mask
from executor.data.prepare import prepare_dataset, prepare_default_corpus
from executor.data.readers import iter_documents
from executor.data.shards import PreparedDataset
from executor.data.tokenizer import SPECIAL_TOKENS
from planner.cli import main


@pytest.fixture(scope="module")
def corpus() -> PreparedDataset:
    t0 = time.perf_counter()
    ds = PreparedDataset(prepare_default_corpus(8192, 4000, progress=False))
    assert time.perf_counter() - t0 < 60  # first call trains the BPE (~11 s here); then cached
    return ds


def loader(ds: PreparedDataset, objective: str, rows: int = 8, seq_len: int = 128,
           **kw: object) -> PackedLoader:
    cfg = LoaderConfig(seq_len=seq_len, rows=rows, objective=objective, seed=3,
                       mixture={"code": 0.5, "english": 0.5}, heldout_docs=16, **kw)
    return PackedLoader(ds, cfg)


def test_default_corpus_domains_and_tokenizer(corpus: PreparedDataset) -> None:
    assert set(corpus.domains) == {"code", "english"}
    assert corpus.vocab_size == 8192
    assert corpus.domains["code"].num_docs > 300 and corpus.domains["english"].num_docs > 200
    tok = corpus.tokenizer
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    text = "def f(x):\n    return x  # é ✓\n"
    assert tok.decode(tok.encode(text).ids) == text  # byte-level: lossless
    # Every document ends with <eot> in the shard.
    code = corpus.domains["code"]
    ends = code.offsets[1:] - 1
    assert np.all(np.asarray(code.tokens[ends]) == corpus.specials.eot)
    assert corpus.verify() == []


def test_ingest_text_jsonl_parquet(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("plain text document number one. " * 20)
    (src / "b.jsonl").write_text("".join(json.dumps({"text": f"json doc {i} " * 10}) + "\n"
                                         for i in range(30)))
    pd.DataFrame({"text": [f"parquet row {i} " * 10 for i in range(40)]}).to_parquet(
        src / "c.parquet")
    docs = list(iter_documents(src))
    assert len(docs) == 1 + 30 + 40
    out = prepare_dataset({"mixed": iter(docs), "pq": iter_documents(src / "c.parquet")},
                          tmp_path / "ds", vocab_size=400, progress=False, fingerprint="x")
    ds = PreparedDataset(out)
    assert ds.summary()["mixed"]["docs"] == 71 and ds.summary()["pq"]["docs"] == 40
    assert ds.vocab_size <= 400
    first = ds.domains["pq"].tokens[: ds.domains["pq"].offsets[1] - 1]
    assert ds.tokenizer.decode(first.tolist()) == "parquet row 0 " * 10
    # Re-preparing the same fingerprint reuses it; a different one is refused.
    assert prepare_dataset({"x": iter(["y"])}, out, 400, fingerprint="x", progress=False) == out
    with pytest.raises(MeshplanError, match="different prepared dataset"):
        prepare_dataset({"x": iter(["y"])}, out, 400, fingerprint="other", progress=False)


def test_bad_jsonl_line_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(MeshplanError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_documents(bad))


def test_data_prepare_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "notes.jsonl"
    src.write_text("".join(json.dumps({"body": f"note {i} about tokens"}) + "\n"
                           for i in range(50)))
    rc = main(["data", "prepare", "--out", str(tmp_path / "ds"), "--source", f"notes={src}",
               "--vocab", "300", "--text-field", "body", "--no-progress"])
    assert rc == 0
    assert "notes: 50 documents" in capsys.readouterr().out
    assert main(["data", "prepare", "--out", str(tmp_path / "d2"), "--source", "oops"]) == 2


def test_loader_is_deterministic_and_resumable(corpus: PreparedDataset) -> None:
    a = loader(corpus, "clm")
    b1, c1 = a.global_batch(0)
    b2, c2 = loader(corpus, "clm").global_batch(0)
    assert c1 == c2 == 8
    assert np.array_equal(b1.input_ids, b2.input_ids)
    # A batch is the concatenation of its rows: rows 8..15 alone equal the second batch.
    second, _ = a.global_batch(8)
    rows = a.batch_from_ids(list(range(8, 16)))
    assert np.array_equal(second.input_ids, rows.input_ids)
    # The blacklist skips ids and the cursor moves past them.
    ids, nxt = a.next_ids(0, {1, 2, 9})
    assert ids == [0, 3, 4, 5, 6, 7, 8, 10] and nxt == 11


def test_clm_packing_labels_positions(corpus: PreparedDataset) -> None:
    batch, _ = loader(corpus, "clm", rows=64).global_batch(0)
    ids, labels = batch.input_ids.numpy(), batch.labels.numpy()
    pos, doc = batch.position_ids.numpy(), batch.doc_ids.numpy()
    eot = corpus.specials.eot
    packed_rows = 0
    for r in range(ids.shape[0]):
        boundary = doc[r, 1:] != doc[r, :-1]
        packed_rows += int(boundary.any())
        # Next-token labels inside a document, no loss across a boundary.
        same = ~boundary
        assert np.array_equal(labels[r, :-1][same], ids[r, 1:][same])
        assert np.all(labels[r, :-1][boundary] == IGNORE_INDEX)
        # A new document starts right after an <eot> and restarts positions at 0.
        assert np.all(ids[r, :-1][boundary] == eot)
        assert np.all(pos[r, 1:][boundary] == 0) and pos[r, 0] == 0
        assert np.all(np.diff(pos[r])[same] == 1)
    assert packed_rows > 0  # the corpus's English paragraphs are short: rows do pack


def test_mixture_follows_weights(corpus: PreparedDataset) -> None:
    ld = PackedLoader(corpus, LoaderConfig(seq_len=64, rows=8, seed=1,
                                           mixture={"code": 0.8, "english": 0.2}))
    share = np.mean([ld.domain_of(i) == "code" for i in range(4000)])
    assert abs(share - 0.8) < 0.025  # 4 sigma of a binomial(4000, 0.8)


def test_mlm_masking_statistics(corpus: PreparedDataset) -> None:
    sp = corpus.specials
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8192, size=200_000)
    ids[::50] = sp.eot  # special tokens are never chosen
    inputs, labels = mlm_mask(ids, rng, sp, 8192, probability=0.15)
    chosen = labels != IGNORE_INDEX
    eligible = ids >= sp.count
    assert not chosen[~eligible].any()
    assert abs(chosen[eligible].mean() - 0.15) < 0.004
    assert np.array_equal(labels[chosen], ids[chosen])
    masked = inputs[chosen] == sp.mask
    same = inputs[chosen] == ids[chosen]
    rand = ~masked & ~same
    assert abs(masked.mean() - 0.8) < 0.01
    assert abs(rand.mean() - 0.1) < 0.01
    assert abs(same.mean() - 0.1) < 0.01  # (a random draw equal to the original: ~1e-5)
    assert np.array_equal(inputs[~chosen], ids[~chosen])  # unchosen tokens untouched
    assert inputs[chosen][rand].min() >= sp.count  # random tokens are never special


def test_mlm_rows_take_loss_on_chosen_positions_only(corpus: PreparedDataset) -> None:
    batch, _ = loader(corpus, "mlm", rows=32).global_batch(0)
    chosen = batch.labels != IGNORE_INDEX
    frac = chosen.float().mean().item()
    assert 0.12 < frac < 0.18
    assert ((batch.input_ids == corpus.specials.mask) & ~chosen).sum() == 0


def test_fim_layout_psm_and_spm_exactly(corpus: PreparedDataset) -> None:
    sp = corpus.specials
    pre, mid, suf = [10, 11], [20], [30, 31, 32]
    assert fim_layout(pre, mid, suf, spm=False, specials=sp) == [
        sp.fim_prefix, 10, 11, sp.fim_suffix, 30, 31, 32, sp.fim_middle, 20]
    assert fim_layout(pre, mid, suf, spm=True, specials=sp) == [
        sp.fim_prefix, sp.fim_suffix, 30, 31, 32, sp.fim_middle, 10, 11, 20]


@pytest.mark.parametrize("spm_rate,spm", [(0.0, False), (1.0, True)])
def test_fim_transform_token_layout(corpus: PreparedDataset, spm_rate: float, spm: bool) -> None:
    tok, sp = corpus.tokenizer, corpus.specials
    text = "def add(a, b):\n    return a + b\n"
    doc = np.asarray(tok.encode(text).ids + [sp.eot])
    out = fim_transform(doc, np.random.default_rng(5), tok, sp, spm_rate)
    # Replay the same draws to know where the character cuts fell.
    prefix, middle, suffix = fim_split(text, np.random.default_rng(5))
    assert prefix + middle + suffix == text
    enc = [tok.encode(s).ids for s in (prefix, middle, suffix)]
    assert out == fim_layout(*enc, spm=spm, specials=sp) + [sp.eot]
    assert out[0] == sp.fim_prefix and out[-1] == sp.eot


def test_fim_rates(corpus: PreparedDataset) -> None:
    ld = loader(corpus, "fim", rows=400, seq_len=64, fim_rate=0.5, fim_spm_rate=0.5)
    batch, _ = ld.global_batch(0)
    ids = batch.input_ids.numpy()
    sp = corpus.specials
    fim_rows = (ids == sp.fim_prefix).any(axis=1)
    # Rows mostly hold one document; ~half of them are FIM-transformed.
    assert 0.4 < fim_rows.mean() < 0.6
    starts = np.flatnonzero(ids.reshape(-1) == sp.fim_prefix)
    nxt = ids.reshape(-1)[np.minimum(starts + 1, ids.size - 1)]
    spm_share = np.mean(nxt == sp.fim_suffix)
    assert 0.38 < spm_share < 0.62
    # FIM rows still carry next-token labels on every real position.
    assert (batch.labels != IGNORE_INDEX).float().mean() > 0.95

