"""A mixture-of-experts layer's step-time terms: router, routed experts as grouped GEMMs,
shared experts, token permutation, the dispatch / combine all-to-alls and the expert-TP
gathers (`costmodels.steptime` adds them where `moe_frac` says a layer is MoE)."""

from __future__ import annotations

import numpy as np

from costmodels import comm
from costmodels.gemm import grouped_gemm_time
from costmodels.step_case import StepCase


def moe_layer(x: StepCase) -> dict[str, np.ndarray]:
    """One MoE layer per micro-batch on one rank: GEMM time forward (`gemm_fwd`) and forward +
    backward (`gemm`: router, routed experts, shared experts, token permutation), the
    weight-gradient GEMMs alone (`gemm_w`), and the
    exposed token exchange (`a2a`) and expert-TP gathers (`tp`)."""
    c, prof, tok, h, ffn, mats, tp, ep = x.c, x.prof, x.tok, x.h, x.ffn, x.mats, x.tp, x.ep
    experts, k, gemm, fwd_bwd, wgrad, ab = x.experts, x.act_exp, x.gemm, x.fwd_bwd, x.wgrad, x.ab
    peak, eff, hbm_bw, gemm_bytes, sms, pad_to = x.peak_gemm, x.gen_eff, x.hbm_bw, x.gemm_bytes, x.sms, x.pad_to
    bw_elem = x.bw_elem
    n = np.shape(tok)
    col = lambda key, d: np.asarray(c[key], dtype=np.float64) if key in c else np.full(n, d)  # noqa: E731
    shared = col("shared_ffn", 0.0)
    imb = np.maximum(col("moe_imbalance", prof.moe_imbalance), 1.0)
    sp_dispatch = np.asarray(c.get("moe_dispatch_sp", np.zeros(n)), dtype=bool) & np.asarray(c["sp"], dtype=bool) & (tp > 1)
    # Routed experts: a rank's tok x k slots spread evenly over the E experts arrive
    # ep x tok x k / E at each of its E / ep experts (every TP rank holds a column slice of
    # each), the busiest rank `imb` times the mean: synchronous all-to-alls wait for it.
    local = experts / ep
    m_e = imb * tok * k * ep / experts
    up_n, down_k = (mats - 1) * ffn / tp, ffn / tp

    def grouped(mm, nn, kk):
        return grouped_gemm_time(local, mm, nn, kk, peak, eff * prof.grouped_gemm_eff, hbm_bw,
                                 gemm_bytes, sms, pad_to)

    routed_fwd = grouped(m_e, up_n, h) + grouped(m_e, h, down_k)
    # backward: dX = dY W^T and dW = X^T dY per expert (Narayanan et al. 2021, Sec. 5.1)
    routed = routed_fwd + grouped(m_e, h, up_n) + grouped(h, up_n, m_e) + grouped(m_e, down_k, h) + grouped(down_k, h, m_e)
    # the router runs on the tokens a rank routes (its sequence shard under SP dispatch)
    tok_route = np.where(sp_dispatch, tok / tp, tok)
    router_fwd = gemm(tok_route, experts, h)
    router = fwd_bwd(tok_route, experts, h)
    has_shared = shared > 0
    sh_up, sh_down = (mats - 1) * np.maximum(shared, 1.0) / tp, np.maximum(shared, 1.0) / tp
    shared_fwd = np.where(has_shared, gemm(tok, sh_up, h) + gemm(tok, h, sh_down), 0.0)
    shared_t = np.where(has_shared, fwd_bwd(tok, sh_up, h) + fwd_bwd(tok, h, sh_down), 0.0)
    # Permutation: gather each token's k copies in expert order and scatter-add them back
    # weighted, forward (read h, write k h; read k h, write h) and the same backward.
    perm_fwd = (2 + 2 * k) * tok_route * h * ab / bw_elem
    gemm_fwd = routed_fwd + router_fwd + shared_fwd + perm_fwd
    gemm_w = grouped(h, up_n, m_e) + grouped(down_k, h, m_e) + wgrad(tok_route, experts, h) + np.where(
        has_shared, wgrad(tok, sh_up, h) + wgrad(tok, h, sh_down), 0.0)
    total = routed + router + shared_t + 2 * perm_fwd
    # Dispatch + combine forward and their adjoints backward: 4 all-to-alls of the routed
    # copies over the ep group; each rank sends (n - 1) / n of its buffer, to its domain's
    # members over the scale-up fabric and to the rest through its own NIC, at once.
    payload = tok_route * k * h * ab
    n_ep = np.maximum(ep, 1.0)
    near = col("ep_local", 1.0)
    up_bw = col("ep_up_bw", np.inf) * 1e9 * prof.link_eff
    out_bw = col("ep_out_bw", np.inf) * 1e9 * prof.link_eff
    one = (n_ep - 1) * col("ep_lat", 0.0) + np.maximum((near - 1) / n_ep * payload / up_bw,
                                                       (n_ep - near) / n_ep * payload / out_bw)
    a2a = np.where(ep > 1, 4 * imb * one, 0.0)
    # SP dispatch: the expert-TP group gathers the dispatched copies before the experts and
    # reduce-scatters their outputs, forward and backward.
    tp_bw = col("tp_bw", np.inf) * prof.link_eff
    gathered = imb * tok * k * h * ab
    moe_tp = np.where(sp_dispatch, 2 * (comm.allgather_time(gathered, tp, tp_bw, col("tp_lat", 0.0))
                                        + comm.reduce_scatter_time(gathered, tp, tp_bw, col("tp_lat", 0.0))), 0.0)
    return {"gemm_fwd": gemm_fwd, "gemm": total, "gemm_w": gemm_w, "a2a": a2a, "tp": moe_tp}
