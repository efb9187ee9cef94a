"""The training stack as an input to the cost model: which attention kernel runs, what is
fused, what overlaps and how model states are held. Structure, not a per-framework fudge
factor: every field below changes which terms the step-time and memory model charge.

`stack_for(framework)` maps the names runs tables use ("NeMo 25.02 (Megatron-Core)",
"Composer/llm-foundry (PyTorch FSDP)", "torchtitan (2024)", ...) onto a Stack; an unknown
or empty name gets `DEFAULT_STACK` (a plain PyTorch-eager stack with FlashAttention-2).
"""

from __future__ import annotations

from dataclasses import dataclass

from costmodels.errors import MeshplanError
from costmodels.pipeline import SCHEDULE_NAMES

ATTENTION_IMPLS = ("math", "flash2", "flash3")  # codes 0, 1, 2 in the case table

# Sustained fraction of dense peak of the attention kernel's forward pass, per generation.
#   flash2  FlashAttention-2: up to 73% of A100 peak forward (Dao 2023, Sec. 4.1, Fig. 5);
#           only ~35% of H100 peak, since it uses neither wgmma nor TMA (Shah et al. 2024,
#           FlashAttention-3, Sec. 1).
#   flash3  FlashAttention-3 / cuDNN fused attention on Hopper: up to 740 TFLOP/s bf16, 75%
#           (Shah et al. 2024, abstract); on Ampere cuDNN's kernel is FA2-class. Blackwell and
#           CDNA3 / CDNA4 have no published figure here: the Hopper fractions are assumed.
#   math    QK^T and PV run as batched GEMMs at the GEMM efficiency; the softmax pass is
#           charged as memory traffic over the materialised scores (see steptime).
ATTENTION_UTILISATION = {
    "flash2": {"ampere": 0.73, "hopper": 0.35, "blackwell": 0.35, "cdna3": 0.35, "cdna4": 0.35, "cpu": 1.0},
    "flash3": {"ampere": 0.73, "hopper": 0.75, "blackwell": 0.75, "cdna3": 0.75, "cdna4": 0.75, "cpu": 1.0},
}


CLASSIC_SCHEDULES = ("gpipe", "1f1b", "interleaved")
MEMORY_LOG_RANKS = ("max", "first")
GIB_GB = 2**30 / 1e9  # GB per GiB
MEGATRON_SCHEDULES = ("1f1b", "interleaved")


@dataclass(frozen=True)
class Stack:
    """What a training framework runs, as far as time and memory are concerned."""

    name: str
    attention: str = "flash2"
    # Elementwise / norm / activation / RoPE kernels: "fused" (Transformer Engine and
    # Megatron-Core fusions: norm fused into the next GEMM's prologue, fused SwiGLU, RoPE and
    # bias-dropout-add) or "eager" (one PyTorch op per step of each formula).
    fusion: str = "eager"
    dropout: bool = False  # hidden and attention dropout on (GPT-era recipes)
    # Tensor-parallel collectives pipelined with the GEMMs that produce / consume them
    # (Megatron-Core `--tp-comm-overlap`, userbuffers; torchtitan async TP).
    tp_comm_overlap: bool = False
    # Gradient reduce-scatter / all-reduce issued per bucket during backward (DDP, FSDP,
    # Megatron-Core `--overlap-grad-reduce`); off for Megatron-LM 2021, which reduced after.
    grad_reduce_overlap: bool = True
    # CUDA graphs replay each micro-batch's kernels without per-op host work.
    cuda_graphs: bool = False
    # Model-state bytes per parameter (memory): weights held as stored (2 = bf16 copy kept
    # beside fp32 master; 4 = FSDP keeps fp32 sharded params and casts per layer), gradient
    # bytes (4 = fp32 main grads), optimizer bytes (fp32 master + m + v = 12, or 8 where the
    # fp32 params are the master).
    weight_bytes: float = 2.0
    grad_bytes: float = 4.0
    optim_bytes: float = 12.0
    # Extra transient bytes on top of states: a second copy of gradients (DeepSpeed's fp16
    # gradients beside its fp32 partition), as bytes per parameter (unsharded).
    grad_copy_bytes: float = 0.0
    # Op-level selective activation checkpointing (torchtitan's "selective": save the outputs
    # of every other matmul, recompute the rest) instead of Korthikanti's attention-only one.
    op_level_sac: bool = False
    # The loss as eager F.cross_entropy on upcast logits (it saves an fp32 log-softmax and
    # its gradient) instead of a fused / vocab-parallel one (`costmodels.memory.logits_bytes`).
    eager_cross_entropy: bool = False
    # FSDP under pipeline parallelism keeps each stage's parameters (16-bit) and gradients
    # (fp32) unsharded across its micro-batches (torchtitan: reshard_after_forward is off
    # when PP is on, since every micro-batch would re-gather them).
    fsdp_unsharded_with_pp: bool = False
    # Full recompute through torch.utils.checkpoint (non-reentrant) stops once the saved
    # tensors are rebuilt: a block re-runs its input gathers and the attention half's TP
    # reduction, not the MLP's. Megatron's reentrant CheckpointFunction re-runs the whole
    # forward, both reductions.
    recompute_early_stop: bool = False
    # MoE layers under TP: each TP rank routes and all-to-alls its sequence shard, and the
    # expert-TP group all-gathers the dispatched tokens before the experts and
    # reduce-scatters their outputs (Megatron-Core's alltoall dispatcher with expert TP =
    # TP), instead of routing the whole gathered token set on every TP rank (meshplan).
    moe_dispatch_sp: bool = False
    # Pipeline schedules it runs (`costmodels.pipeline` names): Megatron-LM 1F1B and its
    # interleaved form; torchtitan every `torch.distributed.pipelining` schedule.
    pipeline_schedules: tuple[str, ...] = CLASSIC_SCHEDULES
    # What the framework's own peak-memory figure is, so a measured figure is compared with
    # the same quantity: "max" over ranks, or "first" = global rank 0's alone (the first
    # pipeline stage: nanotron's benchmark table is written by rank 0, `create_table_log`);
    # and its unit in GB (torchtitan's and nanotron's loggers divide by 2**30: GiB). Which
    # counter it is differs too (torchtitan: max reserved; nanotron's table has both
    # allocated and reserved; meshplan's runs: max allocated): the profile's allocator factor
    # and constant (`Profile.memory_factor`) are fitted across them.
    memory_log_rank: str = "max"
    memory_log_unit_gb: float = 1.0

    def __post_init__(self) -> None:
        if self.memory_log_rank not in MEMORY_LOG_RANKS:
            raise MeshplanError(f"stack {self.name}: memory_log_rank={self.memory_log_rank!r} must be one of "
                                f"{MEMORY_LOG_RANKS}")
        if self.attention not in ATTENTION_IMPLS:
            raise MeshplanError(f"stack {self.name}: attention={self.attention!r} must be one of {ATTENTION_IMPLS}")
        if self.fusion not in ("fused", "eager"):
            raise MeshplanError(f"stack {self.name}: fusion={self.fusion!r} must be fused or eager")


STACKS: dict[str, Stack] = {
    s.name: s
    for s in (
        # Megatron-Core with Transformer Engine (cuDNN attention), as NeMo and the Megatron
        # README benchmarks run it: TP comm overlap, overlapped grad reduce and param gather,
        # distributed optimizer with fp32 main grads (Megatron-Core docs, "distributed optimizer").
        Stack("megatron-core", attention="flash3", fusion="fused", tp_comm_overlap=True,
              moe_dispatch_sp=True, pipeline_schedules=MEGATRON_SCHEDULES),
        Stack("nemo", attention="flash3", fusion="fused", tp_comm_overlap=True, moe_dispatch_sp=True,
              pipeline_schedules=MEGATRON_SCHEDULES),
        # Megatron-LM as of Narayanan et al. 2021: fused scale-mask-softmax over materialised
        # scores, dropout on, TP collectives and the DP all-reduce not overlapped.
        Stack("megatron-lm-2021", attention="math", fusion="fused", dropout=True,
              grad_reduce_overlap=False, pipeline_schedules=MEGATRON_SCHEDULES),
        # Megatron-DeepSpeed: FlashAttention-2, DeepSpeed ZeRO keeps fp16 grads beside the
        # fp32 partition (Rajbhandari et al. 2020, Sec. 5).
        Stack("megatron-deepspeed", attention="flash2", fusion="fused", grad_bytes=2.0,
              grad_copy_bytes=4.0, pipeline_schedules=MEGATRON_SCHEDULES),
        # DeepSpeed's PipelineEngine runs its 1F1B TrainSchedule.
        Stack("deepspeed", attention="flash2", fusion="eager", grad_bytes=2.0, grad_copy_bytes=4.0,
              pipeline_schedules=("1f1b",)),
        # torchtitan (2024): SDPA's FlashAttention-2 backend, eager ops, FSDP2 with fp32
        # sharded params cast to bf16 per layer, op-level SAC for "selective".
        Stack("torchtitan", attention="flash2", fusion="eager", weight_bytes=4.0, optim_bytes=8.0,
              op_level_sac=True, eager_cross_entropy=True, fsdp_unsharded_with_pp=True,
              recompute_early_stop=True, pipeline_schedules=SCHEDULE_NAMES, memory_log_unit_gb=GIB_GB),
        # llm-foundry / Composer: FSDP (1) with fp32 flat params, flash-attn 2.
        Stack("llm-foundry", attention="flash2", fusion="eager", weight_bytes=4.0, optim_bytes=8.0,
              eager_cross_entropy=True),
        # MaxText on GPU: XLA-fused elementwise, cuDNN flash attention through TE.
        Stack("maxtext", attention="flash3", fusion="fused", weight_bytes=4.0, optim_bytes=8.0),
        # nanotron: flash-attn 2, eager ops, bf16 gradients accumulated into an fp32 buffer;
        # its benchmark table's memory is rank 0's `torch.cuda.max_memory_*` in GiB.
        Stack("nanotron", attention="flash2", fusion="eager", grad_copy_bytes=2.0,
              memory_log_rank="first", memory_log_unit_gb=GIB_GB),
        # This project's executor: torch SDPA, eager modules, FSDP2 / DDP; bf16 autocast over
        # fp32 parameters (they are the master: 4 + 4 + 8 bytes); torch.utils.checkpoint.
        Stack("meshplan", attention="flash2", fusion="eager", eager_cross_entropy=True,
              weight_bytes=4.0, optim_bytes=8.0, recompute_early_stop=True,
              pipeline_schedules=SCHEDULE_NAMES),
    )
}
DEFAULT_STACK = STACKS["meshplan"]

# Substrings of framework names as runs tables spell them, checked in this order.
_ALIASES: tuple[tuple[str, str], ...] = (
    ("megatron-deepspeed", "megatron-deepspeed"), ("megatron deepspeed", "megatron-deepspeed"),
    ("nemo", "nemo"), ("megatron-core", "megatron-core"), ("megatron core", "megatron-core"),
    ("mcore", "megatron-core"), ("megatron-lm (2021)", "megatron-lm-2021"),
    ("megatron-lm 2021", "megatron-lm-2021"), ("megatron", "megatron-core"), ("torchtitan", "torchtitan"), ("llm-foundry", "llm-foundry"),
    ("foundry", "llm-foundry"), ("composer", "llm-foundry"), ("maxtext", "maxtext"),
    ("nanotron", "nanotron"), ("deepspeed", "deepspeed"), ("meshplan", "meshplan"),
)


def stack_for(framework: str | None) -> Stack:
    """The stack a framework name describes; the default stack when unknown or empty."""
    name = (framework or "").strip().lower()
    if not name:
        return DEFAULT_STACK
    if name in STACKS:
        return STACKS[name]
    for needle, key in _ALIASES:
        if needle in name:
            return STACKS[key]
    return DEFAULT_STACK


def known_framework(framework: str) -> bool:
    name = framework.strip().lower()
    return name in STACKS or any(needle in name for needle, _ in _ALIASES)


def stack_columns(stack: Stack) -> dict[str, float]:
    """Scalar case-table columns of a stack."""
    return {
        "attn_impl": ATTENTION_IMPLS.index(stack.attention),
        "fused": stack.fusion == "fused",
        "dropout": stack.dropout,
        "tp_comm_overlap": stack.tp_comm_overlap,
        "grad_overlap": stack.grad_reduce_overlap,
        "cuda_graphs": stack.cuda_graphs,
        "state_weight_bytes": stack.weight_bytes,
        "state_grad_bytes": stack.grad_bytes,
        "state_optim_bytes": stack.optim_bytes,
        "grad_copy_bytes": stack.grad_copy_bytes,
        "op_level_sac": stack.op_level_sac,
        "eager_cross_entropy": stack.eager_cross_entropy,
        "fsdp_unsharded_with_pp": stack.fsdp_unsharded_with_pp,
        "recompute_early_stop": stack.recompute_early_stop,
        "moe_dispatch_sp": stack.moe_dispatch_sp,
        "mem_log_first_rank": stack.memory_log_rank == "first",
        "mem_log_unit_gb": stack.memory_log_unit_gb,
    }
