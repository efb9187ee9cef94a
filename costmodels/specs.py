"""The three descriptions the cost model is a function of (after Calculon's split):
the model (`ModelSpec`), the execution strategy (`Layout`) and the system (`ClusterSpec`,
built on an `Accelerator` from `costmodels.hardware`).

All are frozen dataclasses that validate themselves; a bad value raises `SpecError` with
one line naming the field and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar, Literal, Self

from costmodels import pipeline
from costmodels.spec_checks import SpecError
from costmodels.spec_checks import one_of as _one_of
from costmodels.spec_checks import positive_int as _positive_int
from costmodels.spec_checks import require as _require

MlpKind = Literal["swiglu", "gelu"]
NormKind = Literal["rmsnorm", "layernorm"]
Sharding = Literal["none", "zero1", "zero2", "zero3"]
Recompute = Literal["none", "selective", "full"]
Precision = Literal["bf16", "fp8", "fp16", "fp32"]
Engine = Literal["torch", "deepspeed"]
Schedule = Literal["gpipe", "1f1b", "interleaved", "zbh1", "interleaved_zb", "zbv", "dualpipev"]

SHARDINGS: tuple[str, ...] = ("none", "zero1", "zero2", "zero3")
# The ZeRO stage of each sharding (Rajbhandari et al. 2020, Sec. 5): its index in SHARDINGS.
ZERO_STAGE: dict[str, int] = {name: stage for stage, name in enumerate(SHARDINGS)}
RECOMPUTES: tuple[str, ...] = ("none", "selective", "full")
PRECISIONS: tuple[str, ...] = ("bf16", "fp8", "fp16", "fp32", "fp4")


class _Spec:
    """What every spec dataclass does with its fields: copies with changes, a plain dict,
    and back from one (an unknown or a missing key named in one line)."""

    SECTION: ClassVar[str]  # the key it is written under in a plan file

    def with_(self, **changes: Any) -> Self:
        return replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        _require(not unknown, f"{cls.SECTION}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as exc:  # missing required fields
            raise SpecError(f"{cls.SECTION}: {exc}") from None


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec(_Spec):
    """A decoder-only (or encoder, for MLM) transformer, LLaMA-style by default."""

    SECTION: ClassVar[str] = "model"
    name: str
    layers: int
    hidden: int
    ffn_hidden: int
    heads: int
    kv_heads: int
    vocab: int
    seq_len: int
    mlp: MlpKind = "swiglu"
    norm: NormKind = "rmsnorm"
    tied_embeddings: bool = False
    bias: bool = False
    qkv_bias: bool = False  # biases on the q, k, v projections only (Qwen2)
    # Mixture of experts (0 = dense). expert_ffn_hidden defaults to ffn_hidden, which stays
    # the width of the dense layers of an MoE model (`dense_layers`, `moe_layer_freq`).
    num_experts: int = 0
    experts_topk: int = 0
    expert_ffn_hidden: int = 0
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    # Attention head width (0 = hidden / heads; Qwen3 sets it apart) and RMSNorm over each
    # query / key head before RoPE (Qwen3's q_norm / k_norm; Dehghani et al. 2023 §3.1).
    attn_head_dim: int = 0
    qk_norm: bool = False
    # MoE routing: softmax or sigmoid scores (DeepSeek-V3), top-k weights renormalised,
    # capacity factor (0 = dropless), always-on shared experts (their total MLP width:
    # 0 = shared_experts x expert_ffn) with an optional sigmoid gate (Qwen1.5/2-MoE), the
    # first `dense_layers` dense (DeepSeek's first_k_dense_replace) and then every
    # `moe_layer_freq`-th layer an MoE one (Megatron-Core's --moe-layer-freq).
    router_score: str = "softmax"
    norm_topk: bool = True
    capacity_factor: float = 0.0
    shared_experts: int = 0
    shared_expert_ffn_hidden: int = 0
    shared_expert_gate: bool = False
    dense_layers: int = 0
    moe_layer_freq: int = 1

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "ffn_hidden", "heads", "kv_heads", "vocab", "seq_len"):
            _positive_int(self, name)
        _one_of(self, "mlp", ("swiglu", "gelu"))
        _one_of(self, "norm", ("rmsnorm", "layernorm"))
        _require(
            self.hidden % self.heads == 0,
            f"ModelSpec.hidden={self.hidden} must be divisible by heads={self.heads}",
        )
        _require(
            self.heads % self.kv_heads == 0,
            f"ModelSpec.kv_heads={self.kv_heads} must divide heads={self.heads} (GQA groups)",
        )
        _require(self.num_experts >= 0, "ModelSpec.num_experts must be >= 0 (0 = dense)")
        for name in ("attn_head_dim", "expert_ffn_hidden", "shared_experts",
                     "shared_expert_ffn_hidden", "dense_layers"):
            _positive_int(self, name, minimum=0)
        _positive_int(self, "moe_layer_freq")
        _one_of(self, "router_score", ("softmax", "sigmoid"))
        _require(self.capacity_factor >= 0,
                 f"ModelSpec.capacity_factor={self.capacity_factor}: must be >= 0 (0 = dropless)")
        if self.num_experts:
            _require(
                1 <= self.experts_topk <= self.num_experts,
                f"ModelSpec.experts_topk={self.experts_topk} must be in 1..num_experts",
            )
            _require(
                self.moe_layers > 0,
                f"ModelSpec.dense_layers={self.dense_layers} leaves no MoE layer of "
                f"{self.layers}; lower dense_layers or set num_experts=0",
            )

    # -- derived sizes
    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        """Width of the query (and attention output) projection: heads x head_dim."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_ffn(self) -> int:
        return self.expert_ffn_hidden or self.ffn_hidden

    @property
    def shared_ffn(self) -> int:
        """Total MLP width of the shared experts (0 without)."""
        if not self.is_moe:
            return 0
        return self.shared_expert_ffn_hidden or self.shared_experts * self.expert_ffn

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (0-based) is an MoE layer: past the dense ones, every moe_layer_freq-th."""
        return self.is_moe and i >= self.dense_layers and (i - self.dense_layers) % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> int:
        """How many layers `is_moe_layer` holds, in closed form (no loop over the layers)."""
        if not self.is_moe or self.layers <= self.dense_layers:
            return 0
        return -(-(self.layers - self.dense_layers) // self.moe_layer_freq)

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of size hidden x ffn in one MLP: 3 for SwiGLU, 2 for GELU."""
        return 3 if self.mlp == "swiglu" else 2

    # -- parameter counts (exactly what executor.model builds)
    def attention_params(self) -> int:
        h, q, kv = self.hidden, self.q_dim, self.kv_dim
        weights = h * q + 2 * h * kv + q * h  # wq, wk, wv, wo
        biases = (q + 2 * kv + h) if self.bias else (q + 2 * kv) if self.qkv_bias else 0
        return weights + biases + (2 * self.head_dim if self.qk_norm else 0)

    def mlp_params(self, ffn: int | None = None) -> int:
        f = ffn or self.ffn_hidden
        weights = self.mlp_matrices * self.hidden * f
        biases = ((self.mlp_matrices - 1) * f + self.hidden) if self.bias else 0
        return weights + biases

    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layernorm" else 1)

    def moe_mlp_params(self, active_only: bool = False) -> int:
        """One MoE layer's feed-forward: router (hidden x experts), the routed experts (the
        top-k of them when `active_only`), the shared experts and their gate."""
        n_exp = self.experts_topk if active_only else self.num_experts
        shared = self.mlp_params(self.shared_ffn) if self.shared_ffn else 0
        gate = self.hidden if self.shared_ffn and self.shared_expert_gate else 0
        return self.hidden * self.num_experts + n_exp * self.mlp_params(self.expert_ffn) + shared + gate

    def layer_params(self, active_only: bool = False, i: int | None = None) -> int:
        """Parameters of layer i (of an MoE layer when i is None and the model has experts)."""
        moe = self.is_moe if i is None else self.is_moe_layer(i)
        ffn = self.moe_mlp_params(active_only) if moe else self.mlp_params()
        return self.attention_params() + ffn + 2 * self.norm_params()

    def embedding_params(self) -> int:
        """Input embedding plus the output projection (unless tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def param_count(self, active_only: bool = False) -> int:
        moe = self.moe_layers
        dense = self.attention_params() + self.mlp_params() + 2 * self.norm_params()
        return (
            moe * self.layer_params(active_only) + (self.layers - moe) * dense
            + self.embedding_params()
            + self.norm_params()  # final norm
        )


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout(_Spec):
    """How one training step is laid out over the cluster (Megatron / torchtitan terms).

    Degrees multiply to the world size: tp * pp * dp * cp = GPUs (ep shards experts inside
    dp * cp, as in Megatron-Core). `global_batch` counts sequences per optimizer step.
    """

    SECTION: ClassVar[str] = "layout"
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    ep: int = 1
    vpp: int = 1
    sharding: Sharding = "none"
    micro_batch: int = 1
    global_batch: int = 1
    recompute: Recompute = "none"
    sequence_parallel: bool = False
    precision: Precision = "bf16"
    engine: Engine = "torch"
    schedule: Schedule = "1f1b"
    # Hierarchical sharding (HSDP; DeepSpeed MiCS / hpZ; Megatron distributed-optimizer
    # instances): ZeRO states are sharded over groups of `dp_shard` DP ranks and replicated
    # across the dp / dp_shard groups. 0 = shard over all of dp.
    dp_shard: int = 0
    # With recompute="full": layers per pipeline rank that are recomputed, the first
    # recompute_layers / vpp of each of its virtual chunks (Megatron's --recompute-num-layers
    # with the block method counts per chunk); 0 = all of them.
    recompute_layers: int = 0
    # Cross entropy over the sequence in this many equal chunks, each chunk's logits
    # recomputed in backward (activation checkpointing of the head and loss; the memory saving
    # of Liger-Kernel's fused linear cross entropy, Hsu et al. 2024): the last stage holds one
    # chunk of the logits at a time and runs the output GEMM's forward twice. 1 = whole.
    loss_chunks: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_shard", "recompute_layers"):
            _positive_int(self, name, minimum=0)
        _positive_int(self, "loss_chunks")
        if self.dp_shard:
            _require(
                self.dp % self.dp_shard == 0,
                f"Layout.dp_shard={self.dp_shard} must divide dp={self.dp}",
            )
        for name in ("tp", "pp", "dp", "cp", "ep", "vpp", "micro_batch", "global_batch"):
            _positive_int(self, name)
        _one_of(self, "sharding", SHARDINGS)
        _one_of(self, "recompute", RECOMPUTES)
        _one_of(self, "precision", PRECISIONS)
        _one_of(self, "engine", ("torch", "deepspeed"))
        _one_of(self, "schedule", pipeline.SCHEDULE_NAMES)
        _require(
            pipeline.placement(self.schedule) != "v" or self.vpp in (1, 2),
            f"Layout.vpp={self.vpp}: schedule {self.schedule} holds two stages per rank (a V); "
            "set vpp=2 (or leave it at 1)",
        )
        _require(
            self.global_batch % (self.micro_batch * self.dp) == 0,
            f"Layout.global_batch={self.global_batch} must be a multiple of micro_batch x dp "
            f"= {self.micro_batch * self.dp}; change global_batch or micro_batch",
        )
        _require(
            self.vpp == 1 or self.pp > 1,
            f"Layout.vpp={self.vpp} needs pp > 1 (interleaving splits pipeline stages)",
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each data-parallel rank."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def shard_group(self) -> int:
        """Ranks one ZeRO shard spans: dp_shard (all of dp when 0) times cp, whose ranks hold
        replicas of the parameters too; 1 without sharding."""
        if self.sharding == "none":
            return 1
        return (self.dp_shard or self.dp) * self.cp

    @property
    def effective_schedule(self) -> str:
        """The schedule this layout runs (`costmodels.pipeline.effective`)."""
        return pipeline.effective(self.schedule, self.vpp)

    @property
    def stages_per_rank(self) -> int:
        """Pipeline stages each rank holds: vpp, or the two of a V schedule."""
        return pipeline.stages_per_rank(self.schedule, self.vpp) if self.pp > 1 else 1

    def check_against(self, model: ModelSpec, world_size: int | None = None) -> None:
        """Check the layout fits the model (and the GPU count when given)."""
        if world_size is not None:
            _require(
                self.world_size == world_size,
                f"layout: tp*pp*dp*cp = {self.tp}*{self.pp}*{self.dp}*{self.cp} = {self.world_size}"
                f" but the cluster has {world_size} GPUs; make the product equal the GPU count",
            )
        _require(
            model.heads % self.tp == 0,
            f"layout.tp={self.tp} must divide the model's {model.heads} attention heads",
        )
        _require(
            model.kv_heads % self.tp == 0 or self.tp % model.kv_heads == 0,
            f"layout.tp={self.tp} must divide or be a multiple of kv_heads={model.kv_heads}",
        )
        stages = self.pp * self.stages_per_rank
        what = (f"layout.pp*vpp={stages}" if self.stages_per_rank == self.vpp else
                f"layout.pp={self.pp} x {self.stages_per_rank} stages per rank ({self.schedule})")
        _require(
            stages <= model.layers,
            f"{what} exceeds the model's {model.layers} layers; use fewer pipeline stages",
        )
        _require(
            model.seq_len % (2 * self.cp) == 0 or self.cp == 1,
            f"layout.cp={self.cp}: seq_len={model.seq_len} must be divisible by 2*cp "
            "(load-balanced ring attention)",
        )
        _require(
            (model.seq_len // self.cp) % self.loss_chunks == 0,
            f"layout.loss_chunks={self.loss_chunks} must divide the {model.seq_len // self.cp} "
            "tokens of a rank's sequence (equal chunks)",
        )
        if self.ep > 1:
            _require(model.is_moe, f"layout.ep={self.ep} needs a mixture-of-experts model")
            _require(
                model.num_experts % self.ep == 0,
                f"layout.ep={self.ep} must divide num_experts={model.num_experts}",
            )
            _require(
                (self.dp * self.cp) % self.ep == 0,
                f"layout.ep={self.ep} must divide dp*cp={self.dp * self.cp}",
            )
        if self.pp > 1:
            problem = pipeline.microbatch_problem(self.schedule, self.pp, self.vpp, self.grad_accum)
            _require(not problem, f"{problem}; raise the global batch size or lower the micro-batch size")
        # Interleaved chunks may be uneven (Megatron-Core's uneven pipeline split): the slowest
        # stage then holds ceil(layers / (pp * vpp)) layers per chunk.



# A re-export: specs is where callers read the three descriptions from.
from costmodels.cluster import ClusterSpec  # noqa: E402, F401
