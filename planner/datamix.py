"""Data sizing: tokens from raw data, a domain mixture over available tokens, epochs.

* raw size -> tokens: bytes / (bytes per char) / (chars per token), with per-language
  defaults or a ratio measured on a sample file with a real tokenizer (a `tokenizers`
  JSON file on disk; nothing is downloaded);
* a mixture (weights per domain) x a token budget -> tokens and epochs per domain, with a
  warning past a repeat threshold (default 4 epochs: Muennighoff et al. 2023 find up to ~4
  epochs of repeated data almost as good as fresh data, with fast decay beyond);
* continual pretraining: new-domain tokens plus a replay share of the old mixture, the
  epochs of each and the compute they cost (C = 6 N D, Kaplan et al. 2020 §2.1).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from costmodels.errors import MeshplanError
from planner.schedule_advice import parse_count

# Rule-of-thumb characters per token for BPE tokenizers with ~32k-128k vocabularies:
# English prose ~4 (OpenAI tokenizer guidance), source code ~3.5 (whitespace and symbols
# split more), Korean ~2 (Hangul syllables rarely merge across). Measure with a sample
# (`measure_sample`) for the tokenizer you will actually use.
CHARS_PER_TOKEN: dict[str, float] = {"en": 4.0, "code": 3.5, "ko": 2.0}
# UTF-8 bytes per character: ASCII text and code are 1 byte per char; Hangul syllables
# (U+AC00-U+D7A3) are 3 bytes each, so 3.0 is the pure-Hangul value (spaces and ASCII
# punctuation make real Korean text somewhat lighter; measure a sample for the exact ratio).
BYTES_PER_CHAR: dict[str, float] = {"en": 1.0, "code": 1.0, "ko": 3.0}
DEFAULT_MAX_EPOCHS = 4.0  # Muennighoff et al. 2023 ("Scaling Data-Constrained LMs"), §5
SAMPLE_LIMIT_CHARS = 8_000_000  # read at most this much of a sample file


def _language(lang: str) -> str:
    key = lang.strip().lower()
    aliases = {"english": "en", "korean": "ko", "kr": "ko", "py": "code", "source": "code"}
    key = aliases.get(key, key)
    if key not in CHARS_PER_TOKEN:
        raise MeshplanError(
            f"--language {lang!r}: unknown; choose one of {', '.join(CHARS_PER_TOKEN)} "
            "or measure with --sample FILE --tokenizer tokenizer.json"
        )
    return key


# --------------------------------------------------------------------------- measurement


@dataclass(frozen=True)
class TokenRatio:
    """How many bytes and characters one token covers, and where the figure comes from."""

    chars_per_token: float
    bytes_per_char: float
    source: str
    sample_chars: int = 0
    sample_tokens: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.chars_per_token * self.bytes_per_char

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["bytes_per_token"] = self.bytes_per_token
        return d


def default_ratio(language: str) -> TokenRatio:
    key = _language(language)
    return TokenRatio(
        CHARS_PER_TOKEN[key], BYTES_PER_CHAR[key],
        source=f"rule of thumb for {key}: {CHARS_PER_TOKEN[key]} chars/token, "
        f"{BYTES_PER_CHAR[key]} bytes/char",
    )


def measure_sample(sample: str | Path, tokenizer_json: str | Path) -> TokenRatio:
    """Tokenize (up to 8M chars of) a sample file with a local `tokenizers` JSON file."""
    sp, tp = Path(sample), Path(tokenizer_json)
    if not sp.is_file():
        raise MeshplanError(f"--sample {sp}: file not found; pass a text file from your corpus")
    if not tp.is_file():
        raise MeshplanError(
            f"--tokenizer {tp}: file not found; pass a local tokenizer.json (nothing is downloaded)"
        )
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tp))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MeshplanError(f"--tokenizer {tp}: not a tokenizers JSON file ({first})") from None
    try:
        with sp.open(encoding="utf-8") as fh:
            text = fh.read(SAMPLE_LIMIT_CHARS)
    except UnicodeDecodeError:
        raise MeshplanError(f"--sample {sp}: not UTF-8 text") from None
    if not text.strip():
        raise MeshplanError(f"--sample {sp}: file is empty; pass a non-empty text sample")
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i : i + 256]) for i in range(0, len(lines), 256)]
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(chunks, add_special_tokens=False))
    if n_tokens == 0:
        raise MeshplanError(f"--sample {sp}: the tokenizer produced no tokens for this file")
    n_chars = len(text)
    n_bytes = len(text.encode("utf-8"))
    return TokenRatio(
        chars_per_token=n_chars / n_tokens, bytes_per_char=n_bytes / n_chars,
        source=f"measured on {sp.name} with {tp.name}", sample_chars=n_chars,
        sample_tokens=n_tokens,
    )


def tokens_from_bytes(size_bytes: float, ratio: TokenRatio) -> float:
    """tokens = bytes / (bytes per char x chars per token)."""
    if not (math.isfinite(size_bytes) and size_bytes > 0):
        raise MeshplanError(f"--data-size {size_bytes!r}: must be a positive size, e.g. 10TB")
    return size_bytes / ratio.bytes_per_token


_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgtpe]i?)?b?\s*$", re.IGNORECASE)


def parse_size_bytes(text: str | float) -> float:
    """'10TB' -> 1e13 bytes, '10TiB' -> 10 x 2^40, '500GB', '2.5e12' (plain bytes)."""
    m = _SIZE.match(str(text))
    if not m:
        raise MeshplanError(f"--data-size {text!r}: not a size; write e.g. 10TB, 500GB or 2TiB")
    value = float(m.group(1)) * (_SIZE_UNITS[m.group(2).lower()] if m.group(2) else 1.0)
    if not (math.isfinite(value) and value > 0):
        raise MeshplanError(f"--data-size {text!r}: must be a positive size")
    return value


_SIZE_UNITS = {
    "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18,
    "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40, "pi": 2.0**50, "ei": 2.0**60,
}


# --------------------------------------------------------------------------- mixtures


def parse_pairs(text: str, what: str) -> dict[str, str]:
    """'web=45,code=17' -> {'web': '45', 'code': '17'}."""
    out: dict[str, str] = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise MeshplanError(f"{what} {item!r}: expected NAME=VALUE, e.g. web=45,code=17")
        name, _, value = item.partition("=")
        name = name.strip()
        if not name:
            raise MeshplanError(f"{what} {item!r}: empty domain name")
        if name in out:
            raise MeshplanError(f"{what}: domain {name!r} given twice")
        out[name] = value.strip()
    if not out:
        raise MeshplanError(f"{what}: needs at least one NAME=VALUE pair")
    return out


def parse_mixture(text: str) -> dict[str, float]:
    """Weights as percentages or fractions; normalised to sum to 1."""
    raw = parse_pairs(text, "--mixture")
    weights: dict[str, float] = {}
    for k, v in raw.items():
        try:
            w = float(v.rstrip("%"))
        except ValueError:
            raise MeshplanError(f"--mixture {k}={v!r}: weight must be a number") from None
        if not (math.isfinite(w) and w >= 0):
            raise MeshplanError(f"--mixture {k}={v!r}: weight must be >= 0")
        weights[k] = w
    total = sum(weights.values())
    if total <= 0:
        raise MeshplanError("--mixture: weights must not all be zero")
    return {k: w / total for k, w in weights.items()}


def parse_available(text: str) -> dict[str, float]:
    """Available (unique) tokens per domain: 'code=200B,web=5T'."""
    return {k: parse_count(v, f"--available {k}") for k, v in parse_pairs(text, "--available").items()}


@dataclass(frozen=True)
class DomainAllocation:
    domain: str
    weight: float
    tokens: float
    available: float | None
    epochs: float | None
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MixturePlan:
    total_tokens: float
    max_epochs: float
    domains: list[DomainAllocation] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [d.warning for d in self.domains if d.warning]

    @property
    def max_tokens_within_threshold(self) -> float | None:
        """Largest budget this mixture can take before any domain passes `max_epochs`."""
        caps = [
            d.available * self.max_epochs / d.weight
            for d in self.domains
            if d.available is not None and d.weight > 0
        ]
        return min(caps) if caps else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_tokens": self.total_tokens,
            "max_epochs": self.max_epochs,
            "domains": [d.to_dict() for d in self.domains],
            "warnings": self.warnings,
            "max_tokens_within_threshold": self.max_tokens_within_threshold,
        }


def plan_mixture(
    total_tokens: float,
    weights: dict[str, float],
    available: dict[str, float] | None = None,
    max_epochs: float = DEFAULT_MAX_EPOCHS,
) -> MixturePlan:
    """Split a token budget by weight; epochs = domain tokens / available unique tokens."""
    if not (math.isfinite(total_tokens) and total_tokens > 0):
        raise MeshplanError(f"token budget {total_tokens!r}: must be > 0")
    if not max_epochs > 0:
        raise MeshplanError(f"--max-epochs {max_epochs}: must be > 0")
    avail = dict(available or {})
    unknown = sorted(set(avail) - set(weights))
    if unknown:
        raise MeshplanError(
            f"--available: domain(s) {', '.join(unknown)} are not in --mixture "
            f"({', '.join(weights)}); add them to the mixture or drop them"
        )
    total_w = sum(weights.values())
    if total_w <= 0:
        raise MeshplanError("--mixture: weights must not all be zero")
    rows: list[DomainAllocation] = []
    for name, w in weights.items():
        share = w / total_w
        tokens = total_tokens * share
        a = avail.get(name)
        epochs = tokens / a if a else None
        warning = None
        if epochs is not None and epochs > max_epochs:
            warning = (
                f"domain {name!r} repeats {epochs:.1f} epochs (> {max_epochs:g}); lower its "
                f"weight, add data, or cut the budget (Muennighoff et al. 2023)"
            )
        rows.append(DomainAllocation(name, share, tokens, a, epochs, warning))
    return MixturePlan(float(total_tokens), float(max_epochs), rows)


# --------------------------------------------------------------------------- continual


@dataclass(frozen=True)
class ContinualPlan:
    params: float
    total_tokens: float
    replay_fraction: float
    new: MixturePlan
    replay: MixturePlan

    @property
    def new_tokens(self) -> float:
        return self.new.total_tokens

    @property
    def replay_tokens(self) -> float:
        return self.replay.total_tokens

    @property
    def new_flops(self) -> float:
        return 6.0 * self.params * self.new_tokens  # C = 6ND (Kaplan et al. 2020 §2.1)

    @property
    def replay_flops(self) -> float:
        return 6.0 * self.params * self.replay_tokens  # C = 6ND

    @property
    def total_flops(self) -> float:
        return self.new_flops + self.replay_flops

    @property
    def warnings(self) -> list[str]:
        return self.new.warnings + self.replay.warnings

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "total_tokens": self.total_tokens,
            "replay_fraction": self.replay_fraction,
            "new_tokens": self.new_tokens,
            "replay_tokens": self.replay_tokens,
            "new_flops": self.new_flops,
            "replay_flops": self.replay_flops,
            "total_flops": self.total_flops,
            "new": self.new.to_dict(),
            "replay": self.replay.to_dict(),
            "warnings": self.warnings,
        }


def plan_continual(
    params: float,
    total_tokens: float,
    new_mixture: dict[str, float],
    replay_fraction: float,
    old_mixture: dict[str, float],
    new_available: dict[str, float] | None = None,
    old_available: dict[str, float] | None = None,
    max_epochs: float = DEFAULT_MAX_EPOCHS,
) -> ContinualPlan:
    """Continual pretraining: (1 - r) of the budget on the new domains, r replayed from the
    old mixture (replay against forgetting: Ibrahim et al. 2024 §5 use 1-5%+ replay)."""
    if not 0 <= replay_fraction < 1:
        raise MeshplanError(f"--replay {replay_fraction}: must be in [0, 1)")
    if not params > 0:
        raise MeshplanError(f"params={params!r}: must be > 0")
    new = plan_mixture(total_tokens * (1 - replay_fraction), new_mixture, new_available, max_epochs)
    if replay_fraction > 0:
        if not old_mixture:
            raise MeshplanError("continual: replay_fraction > 0 needs the old mixture's weights")
        replay = plan_mixture(total_tokens * replay_fraction, old_mixture, old_available, max_epochs)
    else:
        replay = MixturePlan(0.0, float(max_epochs), [])
    return ContinualPlan(float(params), float(total_tokens), float(replay_fraction), new, replay)
