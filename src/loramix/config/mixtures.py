"""The configs of the other mixtures of LoRA experts: ``MolaConfig`` (MoLA, arXiv 2402.08562),
``LoraMoeConfig`` (LoRAMoE, arXiv 2312.09979) and ``HydraLoraConfig`` (HydraLoRA, arXiv 2404.19245)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .settings import ADAPTER_DTYPE_HELP, INIT_HELP, AdapterSettings, ConfigError, help_field, is_int, is_number


MOLA_MAX_EXPERTS = 256  # above it an int is an unquoted allocation (YAML reads 2468 as a number), not a count


MOLA_DISPATCHES = ("auto", "dense", "sorted")


@dataclass
class MolaConfig(AdapterSettings):
    """MoLA (Gao et al., arXiv 2402.08562): top-k routed LoRA experts on each targeted projection, with
    layer-wise expert counts ("higher layers need more LoRA experts").

    ``y = W z + s · Σ_{e ∈ topk(p)} (p_e / Σ_{j ∈ topk} p_j) · B_e A_e dropout(z)`` with ``p = softmax(W_r z)``
    over the E_l experts of the projection's layer l. ``num_experts`` lays E_l over the layers: one count for every
    layer, a digit string naming the counts of equal contiguous layer groups from the lowest layers up (the paper's
    "2468", "8642", "5555", "3333", ...), or one count per layer. Defaults are the paper's where it gives them:
    allocation 2468 (its best, MoLA-▽), top-2, rank 8, alpha 16, every attention and FFN projection; dropout 0.05
    and the router init N(0, 0.02) are assumed (MoE-PEFT's, the paper says neither). The paper has no balancing
    loss (``aux_loss_coef`` 0); the optional one is the Switch loss MixLoRA uses.
    """

    kind: ClassVar[str] = "mola"

    r: int = help_field("Rank of every expert LoRA (the paper: 8).", 8)
    alpha: float = help_field("Expert LoRA alpha; the scale is alpha / r (the paper: 16).", 16)
    dropout: float = help_field("Dropout on the LoRA input, one mask shared by the experts (0 allowed).", 0.05)
    num_experts: int | str | list[int] = help_field(
        "Experts per adapted projection, by layer: an integer (every layer), an allocation string of digits 1-9 "
        "giving the count of each of len(string) equal contiguous layer groups from the lowest layers up (layer i "
        "of L is in group i * len // L; '2468': 2/4/6/8 experts in the four quarters, the paper's best; also "
        "'8642', '5555', '3333'; quote it in YAML), or a list with one count per decoder layer.", "2468",
    )
    top_k: int = help_field("Experts per token, at most the smallest layer's count (the paper: 2).", 2)
    targets: list[str] | None = help_field(
        "Projections given MoLA experts, attention and/or FFN, e.g. [q_proj, v_proj] (null: every attention and "
        "FFN projection of the model family, as the paper).", None,
    )
    aux_loss_coef: float = help_field(
        "Weight of the Switch load-balance loss E · Σ_i f_i P_i (per module, over the non-padding tokens) added to "
        "the LM loss; 0: none, as the paper.", 0.0,
    )
    router_init_std: float = help_field("Std of the normal init of the router weights.", 0.02)
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r) for the experts.", False)
    init: str = help_field(INIT_HELP, "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)
    dispatch: str = help_field(
        "The experts' fast path, the same results either way: 'auto' (each expert on the tokens that chose it in "
        "CPU training with at least 3 experts per chosen one, every expert densely elsewhere), 'dense' or 'sorted'.",
        "auto",
    )

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_rslora")
        self._check_numbers("aux_loss_coef", "router_init_std")
        self._check("dispatch", self.dispatch in MOLA_DISPATCHES, f"one of {MOLA_DISPATCHES}")
        counts = self._allocation()
        self._check("top_k", is_int(self.top_k, minimum=1) and self.top_k <= min(counts),
                    f"an integer in [1, {min(counts)}] (the fewest experts num_experts={self.num_experts!r} gives "
                    "a layer)")

    def _allocation(self) -> list[int]:
        """The counts ``num_experts`` names, in order (one entry: every layer); checks and normalises it."""
        value = self.num_experts
        expected = (f"an integer in [1, {MOLA_MAX_EXPERTS}], a string of digits 1-9 such as '2468' (per layer "
                    "group, lowest first) or a list of positive integers (one per layer)")
        if isinstance(value, tuple):
            value = self.num_experts = list(value)
        if is_int(value):
            hint = " (an allocation such as 2468 must be quoted in YAML: '2468')" if value > MOLA_MAX_EXPERTS else ""
            self._check("num_experts", 1 <= value <= MOLA_MAX_EXPERTS, expected + hint)
            return [value]
        if isinstance(value, str):
            self._check("num_experts", value.isascii() and value.isdigit() and "0" not in value, expected)
            return [int(c) for c in value]
        ok = isinstance(value, list) and len(value) > 0 and all(is_int(n, minimum=1) for n in value)
        self._check("num_experts", ok, expected)
        return list(value)

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """E_l for each of ``num_layers`` decoder layers, e.g. '2468' over 8 layers → [2, 2, 4, 4, 6, 6, 8, 8];
        a ``ConfigError`` naming num_experts when it cannot be laid over them."""
        counts = self._allocation()
        if is_int(self.num_experts):
            return counts * num_layers
        if isinstance(self.num_experts, list):
            if len(counts) != num_layers:
                raise ConfigError(f"lists {len(counts)} per-layer counts, but the model has {num_layers} decoder "
                                  "layers: give one per layer, or an allocation string such as '2468'", "num_experts")
            return counts
        if len(counts) > num_layers:
            raise ConfigError(f"{self.num_experts!r} names {len(counts)} layer groups, but the model has only "
                              f"{num_layers} decoder layers: use at most {num_layers} digits", "num_experts")
        return [counts[i * len(counts) // num_layers] for i in range(num_layers)]


@dataclass
class LoraMoeConfig(AdapterSettings):
    """LoRAMoE (Dou et al., arXiv 2312.09979): a dense mixture of LoRA experts on each FFN projection.

    ``y = W z + Σ_e g_e(z) · s · B_e A_e dropout(z)`` with ``g = softmax(W_r z)`` over all experts (every
    expert contributes). The localized balancing constraint splits the experts into groups, one per sample
    type (``tasks``), and adds ``balance_coef · CV²(I ∘ Q)``: Q (samples, experts) the summed router weights
    of each sample's tokens, I = 1 + balance_delta where an expert's group is the sample's type, else
    1 - balance_delta. Defaults are the paper's (6 experts of rank 4 on gate/up/down, β = δ = 0.1; alpha 32
    and dropout 0.05 from the authors' script).
    """

    kind: ClassVar[str] = "loramoe"

    r: int = help_field("Rank of every expert LoRA (the paper: 4).", 4)
    alpha: float = help_field("Expert LoRA alpha; the scale is alpha / r (the authors' script: 32).", 32)
    dropout: float = help_field("Dropout on the LoRA input, one mask shared by the experts (0 allowed).", 0.05)
    num_experts: int = help_field("LoRA experts per adapted projection (the paper: 6).", 6)
    targets: list[str] | None = help_field(
        "FFN projections given a LoRAMoE layer, e.g. [gate_proj, up_proj, down_proj] (null: every FFN projection "
        "of the model family, as the paper).", None,
    )
    tasks: list[str] | None = help_field(
        "Sample types of the localized balancing constraint, in group order: a sample whose task (the data's "
        "task column, task_ids) is tasks[i] prefers expert group i. Null: no types, the plain importance balance "
        "CV²(Q).", None,
    )
    group_sizes: list[int] | None = help_field(
        "Experts per group, one entry per task, summing to num_experts (null: num_experts split evenly).", None,
    )
    balance_coef: float = help_field("β, weight of the localized balancing loss added to the LM loss.", 0.1)
    balance_delta: float = help_field(
        "δ in [0, 1): a sample's importance for its own group's experts is weighted 1 + δ, for the others 1 - δ.",
        0.1,
    )
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r) for the experts.", False)
    init: str = help_field(INIT_HELP, "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_rslora")
        self._check_numbers("num_experts", positive=True, integer=True)
        self._check_numbers("balance_coef")
        delta = self.balance_delta
        self._check("balance_delta", is_number(delta) and 0 <= delta < 1, "a number in [0, 1)")
        self._check_task_names()
        if self.group_sizes is not None:
            count = len(self.tasks or [])
            ok = isinstance(self.group_sizes, (list, tuple)) and len(self.group_sizes) == count and all(
                is_int(n, minimum=1) for n in self.group_sizes) and sum(self.group_sizes) == self.num_experts
            self._check("group_sizes", ok, f"null or {count} positive integers (one per task in 'tasks') summing to "
                                           f"num_experts={self.num_experts}")
            self.group_sizes = list(self.group_sizes)
        elif self.tasks is not None and self.num_experts % len(self.tasks):
            raise ConfigError(f"must be set: num_experts={self.num_experts} cannot be split evenly into "
                              f"{len(self.tasks)} groups (one per task in 'tasks'); or change num_experts", "group_sizes")

    def expert_groups(self) -> list[int] | None:
        """The group (index into ``tasks``) of each expert, e.g. [0, 0, 0, 1, 1, 1]; None without tasks."""
        if self.tasks is None:
            return None
        sizes = self.group_sizes or [self.num_experts // len(self.tasks)] * len(self.tasks)
        return [g for g, n in enumerate(sizes) for _ in range(n)]


@dataclass
class HydraLoraConfig(AdapterSettings):
    """HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245): an asymmetric LoRA, one shared A and N B heads.

    ``y = W z + s · Σ_i g_i(z) B_i A dropout(z)`` with ``g = softmax(W_g z)`` over the heads (dense: every head
    contributes). A (r × in) is shared by the heads of a projection, each head B_i is (out × r). No auxiliary loss
    (the paper has none). Defaults: r = 8 (the paper's Table 2), 4 heads (the paper's best k, Fig. 8, and the
    authors' script), the FFN projections, alpha 32 and dropout 0.05 (the authors' script).
    """

    kind: ClassVar[str] = "hydralora"

    r: int = help_field("Rank of the shared A and of every B head (the paper: 8).", 8)
    alpha: float = help_field("LoRA alpha; the scale is alpha / r (the authors' script: 32).", 32)
    dropout: float = help_field("Dropout on the input of the shared A (0 allowed; the authors' script: 0.05).", 0.05)
    num_heads: int = help_field(
        "N, the B heads per adapted projection, mixed by the router (the paper: the number of intrinsic "
        "components of the corpus, e.g. found by k-means; its best on Dolly-15K and the authors' script: 4).", 4,
    )
    targets: list[str] | None = help_field(
        "Projections given a HydraLoRA layer, attention and/or FFN, e.g. [gate_proj, up_proj, down_proj] "
        "(null: every FFN projection of the model family, as the authors' script).", None,
    )
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r).", False)
    init: str = help_field(INIT_HELP + " The router: PyTorch's Linear init (Kaiming-uniform), as the authors'.",
                           "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_rslora")
        self._check_numbers("num_heads", positive=True, integer=True)
