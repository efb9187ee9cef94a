"""Training objectives applied to packed token windows.

* CLM: predict the next token inside the same document.
* MLM (Devlin et al. 2019, §3.1 "Task #1"): choose each non-special token with probability
  p (0.15); of the chosen, 80% become `<mask>`, 10% a random token, 10% stay; the loss is
  taken on the chosen positions only.
* FIM (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the Middle"):
  split a document at two uniformly random *character* positions into prefix / middle /
  suffix (§3), then emit PSM  `<PRE> prefix <SUF> suffix <MID> middle` or SPM
  `<PRE> <SUF> suffix <MID> prefix middle` (the SPM variant of Appendix D), followed by the
  document's `<eot>` when it has one; applied per document with probability `fim_rate`,
  SPM with probability `fim_spm_rate`.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from executor.data.batch import IGNORE_INDEX
from executor.data.tokenizer import Specials

# BERT's replacement split (Devlin et al. 2019, §3.1): mask / random / unchanged.
MLM_MASK_SHARE = 0.8
MLM_RANDOM_SHARE = 0.1


def clm_labels(seq: np.ndarray, doc: np.ndarray, pad: int | None = None) -> np.ndarray:
    """Next-token labels for a window of T+1 tokens: label[i] = seq[i+1] if it belongs to the
    same document (and is not padding), else IGNORE_INDEX. Returns [T]."""
    labels = seq[1:].astype(np.int64).copy()
    same = doc[1:] == doc[:-1]
    if pad is not None:
        same &= seq[1:] != pad
    labels[~same] = IGNORE_INDEX
    return labels


def mlm_mask(
    ids: np.ndarray, rng: np.random.Generator, specials: Specials, vocab_size: int,
    probability: float = 0.15,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking of one row: returns (inputs, labels)."""
    n = len(ids)
    candidate = ids >= specials.count  # special tokens (ids 0..5) are never chosen
    chosen = (rng.random(n) < probability) & candidate
    action = rng.random(n)
    random_tokens = rng.integers(specials.count, vocab_size, size=n)
    inputs = ids.astype(np.int64).copy()
    to_mask = chosen & (action < MLM_MASK_SHARE)
    to_random = chosen & (action >= MLM_MASK_SHARE) & (action < MLM_MASK_SHARE + MLM_RANDOM_SHARE)
    inputs[to_mask] = specials.mask
    inputs[to_random] = random_tokens[to_random]
    labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
    labels[chosen] = ids[chosen]
    return inputs, labels


def fim_layout(
    prefix: list[int], middle: list[int], suffix: list[int], spm: bool, specials: Specials
) -> list[int]:
    """Token layout of one FIM example (Bavarian et al. 2022, §3 and Appendix D)."""
    if spm:
        return [specials.fim_prefix, specials.fim_suffix, *suffix, specials.fim_middle,
                *prefix, *middle]
    return [specials.fim_prefix, *prefix, specials.fim_suffix, *suffix, specials.fim_middle,
            *middle]


def fim_split(text: str, rng: np.random.Generator) -> tuple[str, str, str]:
    """Two uniformly random character positions cut the text into prefix, middle, suffix."""
    lo, hi = sorted(int(x) for x in rng.integers(0, len(text) + 1, size=2))
    return text[:lo], text[lo:hi], text[hi:]


def fim_transform(
    ids: np.ndarray, rng: np.random.Generator, tokenizer: Tokenizer, specials: Specials,
    spm_rate: float,
) -> list[int]:
    """FIM-transform one document (its trailing `<eot>`, if any, stays at the end)."""
    body = ids.tolist()
    tail: list[int] = []
    if body and body[-1] == specials.eot:
        body, tail = body[:-1], [specials.eot]
    text = tokenizer.decode(body, skip_special_tokens=False)
    prefix, middle, suffix = fim_split(text, rng)
    spm = bool(rng.random() < spm_rate)
    # Three plain encodes: for strings this short, encode_batch's thread pool costs more.
    pre, mid, suf = (tokenizer.encode(s, add_special_tokens=False).ids
                     for s in (prefix, middle, suffix))
    return fim_layout(pre, mid, suf, spm, specials) + tail
