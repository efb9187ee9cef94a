"""`meshplan size`: model size and token count for a compute budget, and the data behind it.

    meshplan size --compute-flops 3.8e25
    meshplan size --gpus 2048 --days 30 --gpu h100-sxm --mfu 40 --inference-tokens 2T
    meshplan size --compute-flops 1e23 --data-size 10TB --language en \\
        --mixture web=45,code=17,wiki+books=20,academic=8,other=10 --available code=200B
    meshplan size --compute-flops 1e23 --seq-len 4096 --global-batch-tokens 4Mi --json
    meshplan size --continual --params 8B --tokens 100B --mixture code=1 --available code=30B \
        --replay 0.15 --old-mixture web=70,books=30 --old-available web=5T

Answers: the 20-tokens-per-parameter rule, the parametric-loss optimum for the chosen fit(s)
with its predicted loss, optionally the inference-optimal size (Sardana & Frankle 2023),
where LLaMA-3 8B at 15T tokens sits against those optima, tokens from raw data and a domain
mixture, and the batch / LR-schedule recommendation.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from costmodels import scaling
from costmodels.errors import MeshplanError
from planner import datamix, schedule_advice, sizing
from planner.commands.size_render import render_size
from planner.model_args import add_old_available_arg


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "size",
        help="compute-optimal / inference-optimal model size and tokens for a budget",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b = p.add_argument_group("compute budget (one of)")
    b.add_argument("--compute-flops", metavar="C", help="training FLOPs, e.g. 3.8e25")
    b.add_argument("--gpus", type=int, help="accelerators in the cluster")
    b.add_argument("--days", type=float, help="wall-clock days of training")
    b.add_argument("--gpu", help="accelerator key (see costmodels.hardware), e.g. h100-sxm")
    b.add_argument(
        "--mfu", type=float, default=None,
        help=f"model FLOPs utilisation in %% (default {scaling.DEFAULT_MFU_PCT:g})",
    )
    b.add_argument(
        "--precision", default="bf16", choices=("bf16", "fp8", "fp32"),
        help="peak used with --gpus/--days (default bf16)",
    )
    s = p.add_argument_group("sizing")
    s.add_argument("--fit", default="both", choices=("hoffmann", "besiroglu", "both"),
                   help="parametric loss fit (default both; besiroglu is the primary answer)")
    s.add_argument("--inference-tokens", metavar="T",
                   help="lifetime inference tokens, e.g. 2T: adds the inference-optimal size")
    d = p.add_argument_group("data")
    d.add_argument("--data-size", metavar="SIZE", help="raw text size, e.g. 10TB, 500GiB")
    d.add_argument("--language", default="en", help="en, code or ko (chars/token defaults)")
    d.add_argument("--sample", metavar="FILE", help="sample text file to measure chars/token")
    d.add_argument("--tokenizer", metavar="JSON", help="local tokenizers JSON for --sample")
    d.add_argument("--mixture", metavar="D=W,...", help="domain weights, e.g. web=45,code=17")
    d.add_argument("--available", metavar="D=T,...",
                   help="unique tokens available per domain, e.g. code=200B,web=5T")
    d.add_argument("--max-epochs", type=float, default=datamix.DEFAULT_MAX_EPOCHS,
                   help="warn when a domain repeats more than this (default 4)")
    d.add_argument("--tokens", metavar="T",
                   help="training-token budget for the mixture (default: the sized answer)")
    c = p.add_argument_group(
        "continual pretraining (--mixture / --available are then the NEW domains)")
    c.add_argument("--continual", action="store_true",
                   help="size a continual run: new-domain tokens plus replay of the old mixture")
    c.add_argument("--params", metavar="N",
                   help="parameters of the model being continued, e.g. 8B (default: the sized "
                        "answer)")
    c.add_argument("--replay", type=float, default=None, metavar="F",
                   help="share of the budget replayed from the old mixture, e.g. 0.15")
    c.add_argument("--old-mixture", metavar="D=W,...",
                   help="the original run's domain weights (what replay draws from)")
    add_old_available_arg(c, "web=5T")
    t = p.add_argument_group("batch and LR schedule")
    t.add_argument("--seq-len", type=int, help="sequence length in tokens")
    t.add_argument("--global-batch-tokens", metavar="T", help="tokens per step, e.g. 4Mi")
    t.add_argument("--micro-batch", type=int, default=1, help="sequences per micro-batch")
    t.add_argument("--dp", type=int, default=1, help="data-parallel degree")
    t.add_argument("--open-ended", action="store_true",
                   help="run length not fixed in advance (recommends WSD over cosine)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- computation


def _budget(args: argparse.Namespace) -> dict[str, Any] | None:
    cluster_args = [args.gpus, args.days, args.gpu]
    if args.compute_flops is not None:
        if any(v is not None for v in cluster_args):
            raise MeshplanError(
                "--compute-flops and --gpus/--days/--gpu are alternatives; pass only one budget"
            )
        if args.mfu is not None:
            raise MeshplanError("--mfu only applies with --gpus/--days/--gpu; drop it")
        c = schedule_advice.parse_count(args.compute_flops, "--compute-flops")
        return {"flops": c, "from": "compute-flops"}
    if any(v is not None for v in cluster_args):
        missing = [n for n, v in zip(("--gpus", "--days", "--gpu"), cluster_args, strict=True)
                   if v is None]
        if missing:
            raise MeshplanError(
                f"budget from a cluster needs {', '.join(missing)} too "
                "(or pass --compute-flops C instead)"
            )
        return sizing.cluster_flops(sizing.ClusterBudget(
            args.gpus, args.days, args.gpu, args.precision, args.mfu))
    return None


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """Everything `meshplan size` reports, as one JSON-able dict."""
    out: dict[str, Any] = {}
    budget = _budget(args)
    fits = sizing.fits_for(args.fit)
    inf_tokens = (
        schedule_advice.parse_count(args.inference_tokens, "--inference-tokens")
        if args.inference_tokens is not None else 0.0
    )
    continual = _is_continual(args)
    has_data = continual or any(
        v is not None
        for v in (args.data_size, args.sample, args.tokenizer, args.mixture, args.available)
    )
    if budget is None and not has_data:
        raise MeshplanError(
            "no budget: pass --compute-flops C, or --gpus N --days D --gpu KEY "
            "(or --data-size / --sample / --mixture for data sizing alone)"
        )
    answer_params: float | None = None
    answer_tokens: float | None = None
    if budget is not None:
        c = budget["flops"]
        out["budget"] = budget
        out.update(sizing.budget_answers(c, fits, inf_tokens))
        answer_params, answer_tokens = out["parametric"]["params"], out["parametric"]["tokens"]
    # Where LLaMA-3 8B at 15T tokens (D/N ~ 1875) sits against each optimum.
    out["reference"] = {
        "llama3_8b": {
            f.key: scaling.distance_from_optimum(
                scaling.LLAMA3_8B_PARAMS, scaling.LLAMA3_8B_TOKENS, f, inf_tokens
            )
            for f in fits
        },
        "source": "LLaMA-3 8B: ~8B params, ~15T tokens (Dubey et al. 2024)",
    }
    if has_data:
        out["data"] = _data(args, answer_tokens)
    if continual:
        out["continual"] = _continual(args, budget, answer_params, answer_tokens)
    if args.seq_len is not None or args.global_batch_tokens is not None:
        out["batch"], out["lr"] = _batch_and_lr(args, answer_params, answer_tokens)
    return out


def _data(args: argparse.Namespace, answer_tokens: float | None) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.sample is not None or args.tokenizer is not None:
        if args.sample is None or args.tokenizer is None:
            raise MeshplanError("--sample and --tokenizer go together: pass both (or neither)")
        ratio = datamix.measure_sample(args.sample, args.tokenizer)
    else:
        ratio = datamix.default_ratio(args.language)
    data["ratio"] = ratio.to_dict()
    if args.data_size is not None:
        size = datamix.parse_size_bytes(args.data_size)
        data["size_bytes"] = size
        data["tokens"] = datamix.tokens_from_bytes(size, ratio)
        if answer_tokens:
            data["epochs_at_answer"] = answer_tokens / data["tokens"]
    if args.available is not None and args.mixture is None:
        raise MeshplanError("--available needs --mixture (the weights of those domains)")
    if args.mixture is not None and not _is_continual(args):  # continual: see _continual
        weights = datamix.parse_mixture(args.mixture)
        available = datamix.parse_available(args.available) if args.available else {}
        if args.tokens is not None:
            budget = schedule_advice.parse_count(args.tokens, "--tokens")
        elif answer_tokens is not None:
            budget = answer_tokens
        else:
            raise MeshplanError(
                "--mixture needs a token budget: pass --tokens T or a compute budget"
            )
        data["mixture"] = datamix.plan_mixture(
            budget, weights, available, args.max_epochs
        ).to_dict()
    return data


def _is_continual(args: argparse.Namespace) -> bool:
    return bool(args.continual or args.replay is not None or args.old_mixture is not None
                or args.old_available is not None)


def _continual(args: argparse.Namespace, budget: dict[str, Any] | None,
               answer_params: float | None, answer_tokens: float | None) -> dict[str, Any]:
    """New-domain and replay tokens, their epochs, and the compute each costs."""
    if args.mixture is None:
        raise MeshplanError("--continual needs --mixture (the new domains' weights, e.g. code=1)")
    if args.params is not None:
        params = schedule_advice.parse_count(args.params, "--params")
    elif answer_params is not None:
        params = answer_params
    else:
        raise MeshplanError("--continual needs --params N (the model being continued, e.g. 8B)")
    if args.tokens is not None:
        tokens = schedule_advice.parse_count(args.tokens, "--tokens")
    elif budget is not None and args.params is not None:
        tokens = budget["flops"] / (6.0 * params)  # D = C / 6N (Kaplan et al. 2020 §2.1)
    elif answer_tokens is not None:
        tokens = answer_tokens
    else:
        raise MeshplanError("--continual needs a token budget: --tokens T or --compute-flops C")
    replay = 0.0 if args.replay is None else float(args.replay)
    if replay > 0 and args.old_mixture is None:
        raise MeshplanError("--replay needs --old-mixture (the original run's domain weights)")
    old = datamix.parse_mixture(args.old_mixture) if args.old_mixture else {}
    old_avail = datamix.parse_available(args.old_available) if args.old_available else {}
    if old_avail and not old:
        raise MeshplanError("--old-available needs --old-mixture (the weights of those domains)")
    new_avail = datamix.parse_available(args.available) if args.available else {}
    cp = datamix.plan_continual(params, tokens, datamix.parse_mixture(args.mixture), replay,
                                old, new_avail, old_avail, args.max_epochs)
    out = cp.to_dict()
    out["formula"] = "new = (1 - replay) x tokens, replay = replay x tokens; C = 6 N D"
    return out


def _batch_and_lr(
    args: argparse.Namespace, params: float | None, tokens: float | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    if args.seq_len is None or args.global_batch_tokens is None:
        raise MeshplanError("batch advice needs both --seq-len and --global-batch-tokens")
    if args.seq_len < 1:
        raise MeshplanError(f"--seq-len {args.seq_len}: must be >= 1")
    target = schedule_advice.parse_count(args.global_batch_tokens, "--global-batch-tokens")
    bp = schedule_advice.solve_grad_accum(target, args.seq_len, args.micro_batch, args.dp)
    batch = bp.to_dict()
    batch["formula"] = "tokens/step = micro x dp x accumulation x seq_len"
    if tokens is None and args.tokens is not None:
        tokens = schedule_advice.parse_count(args.tokens, "--tokens")
    if params is None or tokens is None:
        return batch, {}
    steps = schedule_advice.steps_for_tokens(tokens, bp.tokens)
    batch["steps"] = steps
    adv = schedule_advice.recommend_lr(params, steps, length_known=not args.open_ended)
    lr = adv.to_dict()
    lr["how"] = (
        "peak LR interpolated log-log between the anchors 3e-4 @ 7B, 1e-4 @ 13B, 3e-5 @ 70B "
        "(held flat outside them); min LR = peak/10; warmup 2% (<10k steps) or 1%"
    )
    return batch, lr


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _check_flags(args: argparse.Namespace) -> None:
    """Numeric flags argparse cannot bound: one line naming the flag on a bad value."""
    import math

    if not (math.isfinite(args.max_epochs) and args.max_epochs > 0):
        raise MeshplanError(f"--max-epochs={args.max_epochs}: must be a positive number")
    for flag in ("micro_batch", "dp"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            raise MeshplanError(f"--{flag.replace('_', '-')}={v}: must be >= 1")


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    res = compute(args)
    if args.json:
        print(json.dumps(_jsonable(res)))
    else:
        render_size(res)
    return 0
