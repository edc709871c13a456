"""The configs of the two papers' kinds and plain LoRA: ``LoraConfig`` (LoRA, rsLoRA, DoRA),
``MixLoraConfig`` (arXiv 2404.15159) and ``MoreConfig`` (arXiv 2505.22694)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .settings import (
    ADAPTER_DTYPE_HELP, ATTENTION_TARGETS, DISPATCHES, INIT_HELP, ROUTINGS, AdapterSettings, ConfigError, help_field,
    is_int, is_number,
)


@dataclass
class LoraConfig(AdapterSettings):
    """Plain LoRA (and rsLoRA, DoRA) on the named linear projections.

    ``y = W z + s · B A dropout(z)`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
    """

    kind: ClassVar[str] = "lora"

    r: int = help_field("LoRA rank.", 8)
    alpha: float = help_field("LoRA alpha; the scale is alpha / r (alpha / sqrt(r) with use_rslora).", 16)
    dropout: float = help_field("Dropout on the LoRA input (0 allowed).", 0.05)
    targets: list[str] | None = help_field(
        "Projection names to adapt, e.g. [q_proj, v_proj] or 'mlp.c_proj' to disambiguate; "
        "null adapts every attention and FFN projection of the model family.",
        factory=lambda: list(ATTENTION_TARGETS),
    )
    use_dora: bool = help_field("DoRA: learned magnitude per output feature times the normalised weight.", False)
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r).", False)
    init: str = help_field(INIT_HELP, "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_dora", "use_rslora")


@dataclass
class MixLoraConfig(AdapterSettings):
    """MixLoRA: sparse top-k mixture of LoRA experts in the FFN, independent LoRA in attention.

    Attention settings (``attention_r`` ...) default to the expert ones when left null.
    """

    kind: ClassVar[str] = "mixlora"

    r: int = help_field("Rank of every expert LoRA.", 16)
    alpha: float = help_field("Expert LoRA alpha (scale alpha / r).", 32)
    dropout: float = help_field("Expert LoRA input dropout (0 allowed).", 0.05)
    num_experts: int = help_field("Experts per FFN block.", 8)
    top_k: int = help_field("Experts per token for routing 'top_k'.", 2)
    routing: str = help_field("'top_k' (default), 'top_p' (dynamic) or 'switch' (top-1 with capacity).", "top_k")
    top_p: float = help_field("routing top_p: keep the smallest prefix of experts reaching this probability.", 0.8)
    temperature: float = help_field("routing top_p: the router logits are divided by this.", 1.0)
    max_experts: int | None = help_field("routing top_p: cap on experts per token (null: no cap).", None)
    capacity_factor: float = help_field("routing switch: capacity = ceil(capacity_factor * tokens / experts).", 1.0)
    attention_targets: list[str] | None = help_field(
        "Attention projections given a plain LoRA (null: all of the family's, [] : none).",
        factory=lambda: list(ATTENTION_TARGETS),
    )
    ffn_targets: list[str] | None = help_field(
        "FFN projections given expert LoRAs (null: all of the family's); the others stay frozen.",
        factory=lambda: ["gate_proj", "up_proj", "down_proj"],
    )
    attention_r: int | None = help_field("Rank of the attention LoRA (null: r).", None)
    attention_alpha: float | None = help_field("Alpha of the attention LoRA (null: alpha).", None)
    attention_dropout: float | None = help_field("Dropout of the attention LoRA (null: dropout).", None)
    use_dora: bool = help_field("DoRA experts and attention LoRA.", False)
    use_rslora: bool = help_field("rsLoRA scaling for experts and attention LoRA.", False)
    init: str = help_field(INIT_HELP, "kaiming")
    aux_loss_coef: float = help_field("Weight of the load-balance loss added to the LM loss.", 0.01)
    z_loss_coef: float = help_field("Weight of the router z-loss.", 0.0)
    jitter: float = help_field("Training only: router input multiplied by U(1-jitter, 1+jitter).", 0.0)
    router_init_std: float = help_field("Std of the normal init of the router weight.", 0.02)
    dispatch: str = help_field("'sorted' (fast path) or 'naive' (per-expert loop, for comparison).", "sorted")
    recompute_experts: bool = help_field(
        "Recompute the expert activations in backward instead of keeping them (less memory, ~1 more FFN forward).",
        False,
    )
    fused: bool = help_field(
        "Training on a SiLU-gated FFN without DoRA: run the expert rows' elementwise work as one torch.compile'd "
        "region (same results; the first step compiles it, tens of seconds on a CPU); false: the eager path.",
        False,
    )
    native_kernel: bool = help_field(
        "On a CPU (fp32 or bf16 rows), a SiLU-gated FFN without DoRA: the expert rows' gather with each expert's "
        "LoRA up step, SwiGLU, mixing and masking in C, three passes over the rows, and for fp32 rows with r % 4 = 0 "
        "and an FFN width % 64 = 0 the experts' LoRA gradients and the down LoRA's A side too (built by the "
        "machine's C compiler on first use and cached; without one, a warning and the eager path); false: the "
        "eager path.",
        True,
    )
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_lora("attention_")
        self._check_targets("attention_targets")
        self._check_targets("ffn_targets")
        self._check_common("use_dora", "use_rslora", "recompute_experts", "fused", "native_kernel")
        self._check_numbers("num_experts", positive=True, integer=True)
        self._check("routing", self.routing in ROUTINGS, f"one of {ROUTINGS}")
        if self.routing == "top_k":
            ok = is_int(self.top_k, minimum=1) and self.top_k <= self.num_experts
            self._check("top_k", ok, f"an integer in [1, num_experts={self.num_experts}]")
        self._check("top_p", is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]")
        if self.max_experts is not None:
            ok = is_int(self.max_experts, minimum=1) and self.max_experts <= self.num_experts
            self._check("max_experts", ok, f"null or an integer in [1, {self.num_experts}]")
        self._check_numbers("temperature", "capacity_factor", positive=True)
        self._check_numbers("aux_loss_coef", "z_loss_coef", "jitter", "router_init_std")
        self._check("jitter", self.jitter < 1, "in [0, 1)")
        self._check("dispatch", self.dispatch in DISPATCHES, f"one of {DISPATCHES}")

    def attention_lora(self) -> LoraConfig:
        """The attention LoRA settings, with nulls filled from the expert settings."""
        own = {"r": self.attention_r, "alpha": self.attention_alpha, "dropout": self.attention_dropout}
        return dataclasses.replace(self.expert_lora(), targets=self.attention_targets,
                                   **{k: v for k, v in own.items() if v is not None})

    def expert_lora(self) -> LoraConfig:
        """The per-expert LoRA settings."""
        return LoraConfig(
            r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.ffn_targets,
            use_dora=self.use_dora, use_rslora=self.use_rslora, init=self.init, adapter_dtype=self.adapter_dtype,
        )


SELECTORS = ("ste", "frozen_random")


@dataclass
class MoreConfig(AdapterSettings):
    """MoRE: nested low-rank experts with a per-task adaptive rank selector (arXiv 2505.22694).

    Every targeted projection holds one LoRA of rank ``max_rank``; expert ``k`` is its first ``k``
    components, and a selector fed with a learned task embedding picks one expert per task:
    ``y = W z + w · s · B[:, :k_t] diag(c²) A[:k_t] dropout(z)``. Tasks are named in ``tasks`` and
    numbered in that order (``task_ids`` passed to the model index this list).
    """

    kind: ClassVar[str] = "more"

    max_rank: int = help_field("R, the rank of the shared LoRA; expert k uses its first k components.", 8)
    ranks: list[int] | None = help_field("The rank set the selector chooses from (null: 1..max_rank), e.g. [2, 4, 8].", None)
    alpha: float = help_field("LoRA alpha; the scale is alpha / max_rank.", 32)
    dropout: float = help_field("Dropout on the LoRA input (0 allowed).", 0.1)
    targets: list[str] | None = help_field(
        "Projection names to adapt (attention and/or FFN, e.g. [q_proj, v_proj, down_proj]); "
        "null adapts every attention and FFN projection of the model family.", None,
    )
    tasks: list[str] | None = help_field(
        "Task names, numbered in this order (task_ids index them). Null: filled by the trainer from the "
        "data, or task0..task{num_tasks-1} when num_tasks is set.", None,
    )
    num_tasks: int | None = help_field("Number of tasks (null: len(tasks)).", None)
    linear_scaling: bool = help_field(
        "Scale component i by c_i = i/max_rank on its A row and B column (c_i² overall).", True,
    )
    contrastive_coef: float = help_field("λ, weight of the task contrastive loss added to the LM loss.", 0.1)
    temperature: float = help_field("τ of the task contrastive loss.", 0.05)
    selector: str = help_field(
        "'ste' (selector trained through the straight-through estimator, the paper) or 'frozen_random' "
        "(ranks drawn once from the random initial selector and frozen, the authors' released code).", "ste",
    )
    task_embedding_std: float = help_field("Std of the normal init of the task embeddings.", 0.01)
    init: str = help_field(INIT_HELP, "kaiming")
    default_task: str | None = help_field(
        "Task used when the model is called without task_ids (null: the only task of a one-task adapter; "
        "with several tasks a missing task_ids is an error).", None,
    )
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora(rank="max_rank")
        self._check_common("linear_scaling")
        self._check_targets("targets")
        if self.ranks is not None:
            ok = isinstance(self.ranks, (list, tuple)) and len(self.ranks) > 0 and all(
                is_int(k) and 1 <= k <= self.max_rank for k in self.ranks)
            self._check("ranks", ok, f"null or a non-empty list of integers in [1, max_rank={self.max_rank}]")
            self.ranks = sorted(set(self.ranks))
        self._check_task_names()
        if self.num_tasks is not None:
            self._check("num_tasks", is_int(self.num_tasks) and self.num_tasks > 0, "null or a positive integer")
            if self.tasks is None:
                self.tasks = [f"task{i}" for i in range(self.num_tasks)]
            elif self.num_tasks != len(self.tasks):
                raise ConfigError(f"is {self.num_tasks} but 'tasks' names {len(self.tasks)} tasks", "num_tasks")
        elif self.tasks is not None:
            self.num_tasks = len(self.tasks)
        self._check_numbers("contrastive_coef", "task_embedding_std")
        self._check_numbers("temperature", positive=True)
        self._check("selector", self.selector in SELECTORS, f"one of {SELECTORS}")
        if self.default_task is not None:
            ok = isinstance(self.default_task, str) and (self.tasks is None or self.default_task in self.tasks)
            self._check("default_task", ok, f"null or one of the task names {self.tasks}")

    def named_tasks(self) -> list[str]:
        """``tasks``, or a ConfigError saying how to name them (the trainer fills them from the data first)."""
        if not self.tasks:
            raise ConfigError("MoRE config names no tasks: set 'tasks' (names, numbered in order) or 'num_tasks'")
        return self.tasks

    @property
    def scale(self) -> float:
        """``s = alpha / max_rank``, the scale of every nested expert (before its ``c²``)."""
        return self.alpha / self.max_rank

    @property
    def rank_set(self) -> list[int]:
        """The ranks the selector chooses from, ascending."""
        return list(self.ranks) if self.ranks is not None else list(range(1, self.max_rank + 1))
