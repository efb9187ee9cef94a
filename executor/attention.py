"""Attention over packed rows: documents packed into one row never attend to each other.

Three backends, chosen automatically and overridable (`train.attention_backend`):

* ``flash``: `flash_attn.flash_attn_varlen_func` (Dao 2023, FlashAttention-2) when the
  package is importable and the tensors live on CUDA;
* ``torch_varlen``: `torch.nn.attention.varlen.varlen_attn` on CUDA when this torch has it;
* ``sdpa``: `torch.nn.functional.scaled_dot_product_attention` with a block-diagonal boolean
  mask built from per-token document ids (causal or bidirectional). Runs anywhere (CPU).

The varlen kernels see the batch flattened to ``[B*T, H, D]`` with `cu_seqlens` marking
document boundaries; SDPA sees ``[B, H, T, D]`` plus the mask. All return ``[B, T, H, D]``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from costmodels.errors import MeshplanError

BACKENDS: tuple[str, ...] = ("auto", "flash", "torch_varlen", "sdpa")


@lru_cache(maxsize=1)
def _flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@lru_cache(maxsize=1)
def _torch_varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """Pick the backend for `device`; an explicit request that cannot run is a user error."""
    dev = torch.device(device)
    if requested not in BACKENDS:
        raise MeshplanError(
            f"train.attention_backend={requested!r}: must be one of {', '.join(BACKENDS)}"
        )
    cuda = dev.type == "cuda"
    if requested == "auto":
        if cuda and _flash_available():
            return "flash"
        if cuda and _torch_varlen_available():
            return "torch_varlen"
        return "sdpa"
    if requested == "flash" and not (cuda and _flash_available()):
        raise MeshplanError(
            "train.attention_backend=flash: needs CUDA and the flash-attn package; "
            "use auto or sdpa"
        )
    if requested == "torch_varlen" and not (cuda and _torch_varlen_available()):
        raise MeshplanError(
            "train.attention_backend=torch_varlen: needs CUDA and torch.nn.attention.varlen; "
            "use auto or sdpa"
        )
    return requested


@dataclass
class AttnContext:
    """What every layer's attention needs about the packing, computed once per forward."""

    backend: str
    causal: bool
    batch: int
    seqlen: int
    mask: torch.Tensor | None = None  # sdpa: [B, 1, T, T] bool, True = may attend
    cu_seqlens: torch.Tensor | None = None  # varlen: [n_docs + 1] int32 over B*T tokens
    max_seqlen: int = 0


def doc_mask(doc_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    """Block-diagonal mask from per-token document ids [B, T] -> [B, 1, T, T] (True = keep)."""
    same = doc_ids.unsqueeze(-1) == doc_ids.unsqueeze(-2)
    if causal:
        t = doc_ids.shape[-1]
        tril = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
        same = same & tril
    return same.unsqueeze(1)


def cu_seqlens_from_doc_ids(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Document boundaries over the flattened [B*T] tokens (a new row always starts one)."""
    b, t = doc_ids.shape
    starts = torch.ones(b, t, dtype=torch.bool, device=doc_ids.device)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(starts.reshape(-1), as_tuple=False).flatten()
    end = torch.tensor([b * t], device=doc_ids.device, dtype=idx.dtype)
    cu = torch.cat([idx, end]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max().item())
    return cu, max_len


def make_context(doc_ids: torch.Tensor, causal: bool, backend: str) -> AttnContext:
    b, t = doc_ids.shape
    ctx = AttnContext(backend=backend, causal=causal, batch=b, seqlen=t)
    if backend == "sdpa":
        ctx.mask = doc_mask(doc_ids, causal)
    else:
        ctx.cu_seqlens, ctx.max_seqlen = cu_seqlens_from_doc_ids(doc_ids)
    return ctx


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hkv, D] (Hq a multiple of Hkv: GQA) -> [B, T, Hq, D].
    A context that brings its own `attend` (context parallelism) runs that instead."""
    own = getattr(ctx, "attend", None)
    if own is not None:
        return own(q, k, v)
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if ctx.backend == "sdpa":
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # GQA: each kv head serves hq/hkv query heads (Ainslie et al. 2023). The CPU kernel
        # takes them as they are (`enable_gqa`: no repeated K/V copy, same numbers); CUDA's
        # masked kernels do not, so there the heads are repeated.
        gqa_kernel = hkv != hq and q.device.type == "cpu"
        if hkv != hq and not gqa_kernel:
            kt = kt.repeat_interleave(hq // hkv, dim=1)
            vt = vt.repeat_interleave(hq // hkv, dim=1)
        gqa = {"enable_gqa": True} if gqa_kernel else {}  # the keyword exists from torch 2.5
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=ctx.mask, **gqa)
        return out.transpose(1, 2)
    qf, kf, vf = q.reshape(b * t, hq, d), k.reshape(b * t, hkv, d), v.reshape(b * t, hkv, d)
    assert ctx.cu_seqlens is not None
    if ctx.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(
            qf, kf, vf, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
            causal=ctx.causal,
        )
    elif ctx.backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(
            qf, kf, vf, ctx.cu_seqlens, ctx.cu_seqlens, ctx.max_seqlen, ctx.max_seqlen,
            window_size=(-1, 0) if ctx.causal else (-1, -1), enable_gqa=hkv != hq,
        )
    else:
        raise MeshplanError(f"attention backend {ctx.backend!r}: unknown; use auto or sdpa")
    return out.reshape(b, t, hq, d)


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_ids: torch.Tensor, causal: bool
) -> torch.Tensor:
    """Run attention document by document (the definition the packed paths must match)."""
    out = torch.zeros_like(q)
    hq, hkv = q.shape[2], k.shape[2]
    for row in range(q.shape[0]):
        ids = doc_ids[row]
        for doc in torch.unique(ids).tolist():
            sel = (ids == doc).nonzero().flatten()
            qd = q[row, sel].transpose(0, 1)
            kd = k[row, sel].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
            vd = v[row, sel].transpose(0, 1).repeat_interleave(hq // hkv, dim=0)
            od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)
            out = out.index_put((torch.tensor([row]), sel), od.transpose(0, 1))
    return out
