"""Byte-level BPE tokenizer trained locally with Hugging Face `tokenizers` (nothing is
downloaded), with the special tokens the objectives need at fixed ids 0..5."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from costmodels.errors import MeshplanError

SPECIAL_TOKENS: tuple[str, ...] = (
    "<eot>", "<pad>", "<mask>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>"
)
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True)
class Specials:
    eot: int
    pad: int
    mask: int
    fim_prefix: int
    fim_middle: int
    fim_suffix: int

    @property
    def count(self) -> int:
        return len(SPECIAL_TOKENS)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (Radford et al. 2019 §2.2; Sennrich et al. 2016): a 256-byte base
    alphabet, so every string is encodable and decoding is lossless."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise MeshplanError(
            f"tokenizer vocab={vocab_size}: too small for byte-level BPE; use >= 263"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def specials_of(tok: Tokenizer) -> Specials:
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if any(i is None for i in ids):
        raise MeshplanError(
            "tokenizer.json lacks the special tokens " + " ".join(SPECIAL_TOKENS)
            + "; re-run `meshplan data prepare`"
        )
    return Specials(*ids)  # type: ignore[arg-type]


def save_tokenizer(tok: Tokenizer, directory: Path) -> Path:
    path = Path(directory) / TOKENIZER_FILE
    tok.save(str(path))
    return path


def load_tokenizer(directory: Path) -> Tokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise MeshplanError(f"{path}: tokenizer not found; re-run `meshplan data prepare`")
    return Tokenizer.from_file(str(path))
