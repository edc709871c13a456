"""What ``loramix bench`` times: its settings, the frozen base model and batch, and the variants.

Variants (each a ``Variant``: a model, its trainable parameters and one training step)::

    peft-lora              peft.get_peft_model(LoraConfig(r, alpha, dropout, q,k,v,o,gate,up,down))
    loramix-lora           loramix LoraConfig on the same projections
    loramix-mixlora        loramix MixLoRA, sorted dispatch (the fast path)
    loramix-mixlora-naive  loramix MixLoRA, dispatch="naive" (per-expert loop, the authors' algorithm)
    loramix-mixlora-recompute  the fast path with recompute_experts=True (expert activations recomputed
                           in backward), listed when asked for with --variants
    loramix-mixlora-fused  the fast path with fused=True (the expert rows' elementwise work torch.compile'd; its
                           first step, a warmup step, compiles), listed when asked for with --variants
    loramix-mixlora-eager  the fast path with native_kernel=False (the expert rows' elementwise work in eager
                           PyTorch instead of the C kernel), listed when asked for with --variants
    authors-mixlora        the MixLoRA authors' ``mixlora`` 0.2.3 package, made trainable
    loramix-loramoe        loramix LoRAMoE (--experts dense experts of rank --rank on gate,up,down; no task types)
    loramix-mola           loramix MoLA (--experts experts in every layer, top --top-k, on all seven projections)
    loramix-mola-dense     the same MoLA with every expert computed densely (dispatch="dense"), the
                           fast path that the sorted one replaces in CPU training
    loramix-hydralora      loramix HydraLoRA (one A and --experts B heads on gate,up,down, the paper's placement)
    (the last three are listed when asked for with --variants)

The variants of one family start from the same adapter weights (PEFT and the authors' code get
copies of loramix's tensors), so with dropout 0 they compute the same losses; ``tests/test_bench.py``
checks that.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..adapters.common import PEFT_PREFIX
from ..config import HydraLoraConfig, LoraConfig, LoraMoeConfig, MixLoraConfig, MolaConfig
from ..hub import resolve_dtype
from ..models.inject import adapter_parameters, inject
from ..models.losses import compose_loss
from ..train.job import adamw

BASELINE = "peft-lora"
DEFAULT_VARIANTS = ("peft-lora", "loramix-lora", "loramix-mixlora", "loramix-mixlora-naive", "authors-mixlora")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]


# ---------------------------------------------------------------------------------------- settings
@dataclass
class BenchSettings:
    """Everything that defines one benchmark (the CLI options, validated)."""

    layers: int = 30
    hidden: int = 576
    intermediate: int = 1536
    heads: int = 9
    kv_heads: int = 3
    vocab: int = 49152
    model: str | None = None
    batch: int = 4
    seq_len: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    experts: int = 8
    top_k: int = 2
    rank: int = 16
    alpha: float | None = None  # None: 2 * rank
    dropout: float = 0.05
    aux_loss_coef: float = 0.01
    steps: int = 8
    warmup: int = 2
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    multi: int = 1
    seed: int = 0
    init_b_std: float = 0.0  # tests: B ~ N(0, std) and a sharp router, so that outputs differ from the base
    memory: bool = True
    quantization: str | None = None  # the frozen base quantized (nf4, nf4-double, int8, torchao-int8, torchao-int4)

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq_len",
                     "experts", "top_k", "rank", "multi"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {self.steps} and {self.warmup}")
        if self.top_k > self.experts:
            raise ValueError(f"--top-k {self.top_k} is larger than --experts {self.experts}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"--hidden {self.hidden} must be divisible by --heads {self.heads}, "
                             f"and --heads by --kv-heads {self.kv_heads}")
        unknown = [v for v in self.variants if v not in BUILDERS]
        if unknown and self.multi == 1:  # --multi N has its own rows (many.py)
            raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(BUILDERS)}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        self.torch_dtype  # an unknown --dtype fails here, before any model is built
        from ..models.quantize import check_quantization

        self.quantization = check_quantization(self.quantization, where="--quantization")  # a ConfigError (ValueError)
        if self.quantization and "authors-mixlora" in self.variants:
            raise ValueError("variant 'authors-mixlora' reads dense weights and cannot run on a quantized base: "
                             "leave it out of --variants with --quantization")

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return resolve_dtype(self.dtype)  # the one table of dtype names (config.DTYPE_NAMES)
        except ValueError as err:
            raise ValueError(f"--dtype: {err}") from None

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# ---------------------------------------------------------------------------------------- model
def build_base_model(s: BenchSettings) -> nn.Module:
    """The frozen base: a random SmolLM2-135M-shaped Llama (or ``s.model``, a real model folder), quantized
    while loading with ``s.quantization`` (the random model goes through a temporary folder, so it is loaded
    exactly as ``loramix train`` loads a quantized base)."""
    dtype, device = s.torch_dtype, s.torch_device
    if s.model is not None:
        from ..hub import load_model

        model, _ = load_model(s.model, dtype=dtype, device=device, quantization=s.quantization)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
            num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
            max_position_embeddings=max(2048, s.seq_len), tie_word_embeddings=True, rms_norm_eps=1e-5,
            rope_theta=100000.0, hidden_act="silu",
        )
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
        if s.quantization:
            import tempfile

            from ..models.quantize import load_quantized

            with tempfile.TemporaryDirectory(prefix="loramix-bench-") as folder:
                model.save_pretrained(folder)
                del model
                model = load_quantized(folder, s.quantization, dtype=dtype, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.train()


def make_batch(s: BenchSettings, vocab: int) -> dict[str, torch.Tensor]:
    """A fixed random batch: input_ids / attention_mask / labels, each (batch, seq_len)."""
    g = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(0, vocab, (s.batch, s.seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return {k: v.to(s.torch_device) for k, v in batch.items()}


def share_frozen_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` whose parameters are the *same* tensors as base's (frozen, shared).

    bitsandbytes' 8-bit modules keep their weight codes and scales in a ``state`` object too: shared
    as well, so a quantized base is not copied per variant."""
    memo: dict[int, Any] = {id(p): p for p in base.parameters()}
    for module in base.modules():
        state = getattr(module, "state", None)
        if type(state).__name__ == "MatmulLtState":
            memo[id(state)] = state
    return copy.deepcopy(base, memo)


# ---------------------------------------------------------------------------------------- variants
@dataclass
class Variant:
    """One trainable setup: a model, its trainable tensors (``params``, made trainable here), its optimizer."""

    name: str
    model: nn.Module
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer | None = None
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in self.params:
            p.requires_grad_(True)
        # the trainer's optimizer (fused where it runs); a step costs the same at any learning rate
        self.optimizer = adamw([{"params": self.params}], lr=1e-4)

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One forward + backward + optimizer step; returns the language-model loss (no aux loss)."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(**batch)
        out.loss.backward()
        self.optimizer.step()
        lm = out.loss.detach()
        state = getattr(self.model, "loramix_adapter", None)
        if state is not None:  # loramix's hook added Σ coef · L_aux (models/losses.py): report the LM part alone
            raw = {k: v.detach() for k, v in state.context.losses.collect().items()}  # what the hook read
            aux = compose_loss(None, raw, state.config)
            lm = lm if aux is None else lm - aux
        return float(lm)


def mixlora_config(s: BenchSettings, **overrides: Any) -> MixLoraConfig:
    return MixLoraConfig(r=s.rank, alpha=s.alpha, dropout=s.dropout, num_experts=s.experts, top_k=s.top_k,
                         attention_targets=ATTENTION, ffn_targets=FFN, aux_loss_coef=s.aux_loss_coef, **overrides)


def kind_config(s: BenchSettings, family: str, **overrides: Any) -> Any:
    """The adapter config of the loramix variants of ``family`` other than MixLoRA's (rank, alpha, dropout; experts
    or heads from --experts; ``overrides``: further fields of MoLA's config)."""
    common = {"r": s.rank, "alpha": s.alpha, "dropout": s.dropout}
    if family == "lora":
        return LoraConfig(**common, targets=ATTENTION + FFN)
    if family == "loramoe":
        return LoraMoeConfig(**common, num_experts=s.experts, targets=FFN)
    if family == "mola":
        return MolaConfig(**common, num_experts=s.experts, top_k=s.top_k, targets=ATTENTION + FFN,
                          aux_loss_coef=s.aux_loss_coef, **overrides)
    return HydraLoraConfig(**common, num_heads=s.experts, targets=FFN)


def _loramix_builder(name: str, family: str, **overrides: Any) -> Callable[[nn.Module, BenchSettings, dict], Variant]:
    """The builder of a loramix variant of ``family`` ("lora", "mixlora", "loramoe", "mola", "hydralora";
    ``overrides``: fields of the MixLoRA or MoLA config).

    The first variant of a family built draws its initial adapter weights (``--init-b-std``: B ~ N(0, std) and a
    sharp router) and keeps a copy in ``shared[family]``; the family's later variants, PEFT's and the authors'
    included, start from that copy."""
    def build(base: nn.Module, s: BenchSettings, shared: dict[str, dict]) -> Variant:
        config = mixlora_config(s, **overrides) if family == "mixlora" else kind_config(s, family, **overrides)
        model = inject(share_frozen_copy(base), config)
        adapter = adapter_parameters(model)
        with torch.no_grad():
            if family in shared:
                for key, tensor in adapter.items():
                    tensor.copy_(shared[family][key])
            elif s.init_b_std > 0:
                g = torch.Generator().manual_seed(s.seed + 2)
                for key, tensor in adapter.items():
                    if ".lora_B" in key:
                        tensor.copy_(torch.randn(tensor.shape, generator=g) * s.init_b_std)
                    elif key.endswith("router.weight"):  # a sharp router: no near-ties in the top-k
                        tensor.copy_(torch.randn(tensor.shape, generator=g))
        shared.setdefault(family, {k: t.detach().clone() for k, t in adapter.items()})
        return Variant(name, model.train(), list(adapter.values()))

    return build


build_loramix_lora = _loramix_builder("loramix-lora", "lora")


def build_peft_lora(base: nn.Module, s: BenchSettings, shared: dict[str, dict]) -> Variant:
    """PEFT LoRA with loramix-lora's initial weights (same A, B, scale alpha / r)."""
    import peft

    if "lora" not in shared:
        build_loramix_lora(base, s, shared)  # only to draw the shared initial weights
    config = peft.LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=ATTENTION + FFN,
                             task_type="CAUSAL_LM", bias="none")
    model = peft.get_peft_model(share_frozen_copy(base), config)
    named = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in shared["lora"].items():
            module, _, which = key.rpartition(".")
            named[f"{PEFT_PREFIX}{module}.{which}.default.weight"].copy_(tensor)
    params = [p for p in model.parameters() if p.requires_grad]
    if len(params) != len(shared["lora"]):
        raise RuntimeError(f"PEFT made {len(params)} trainable tensors, expected {len(shared['lora'])}")
    return Variant("peft-lora", model.train(), params)


def build_authors_mixlora(base: nn.Module, s: BenchSettings, shared: dict[str, dict]) -> Variant:
    """The authors' ``mixlora`` 0.2.3 forward, made trainable with loramix-mixlora's initial weights.

    Their modules keep the expert LoRAs in a plain dict and the router as a plain tensor, so the
    optimizer gets those tensors collected by hand. Their LoraLinear asserts dropout > 0: with
    ``--dropout 0`` it is built with a placeholder and its dropout replaced by the identity.
    """
    try:
        import mixlora as authors
    except ImportError as err:
        raise RuntimeError("variant 'authors-mixlora' needs the authors' package: "
                           "pip install --no-deps mixlora==0.2.3") from err
    if "mixlora" not in shared:
        BUILDERS["loramix-mixlora"](base, s, shared)  # only to draw the shared initial weights
    model = share_frozen_copy(base)
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise RuntimeError("authors-mixlora supports Llama-like models (model.model.layers) only")
    weights: dict[str, torch.Tensor] = {}
    for key, tensor in shared["mixlora"].items():
        parts = key.split(".")  # model.layers.L.<block>.<proj>.lora_A | model.layers.L.mlp.experts.lora_A.<proj>
        layer = parts[2]
        if parts[3] == "self_attn":
            weights[f"mixlora.layers.{layer}.self_attn.{parts[4]}.{parts[5]}.weight"] = tensor.clone()
        elif parts[4] == "router":
            weights[f"mixlora.layers.{layer}.mlp.moe_gate.weight"] = tensor.clone()
        else:
            which, proj = parts[5], parts[6]
            for e in range(tensor.shape[0]):
                weights[f"mixlora.layers.{layer}.mlp.{proj}.experts.{e}.{which}.weight"] = tensor[e].clone()
    config = authors.MixLoraConfig(
        base_model_="bench", task_type_="CAUSAL_LM", peft_type_="MIXLORA", adapter_name_="default",
        dtype_=s.torch_dtype, lora_init_="original", lora_r_=s.rank, lora_alpha_=s.alpha,
        lora_dropout_=s.dropout if s.dropout > 0 else 0.05,
        target_modules_={name: True for name in ATTENTION + FFN}, router_aux_loss_coef_=s.aux_loss_coef,
        router_init_range_=0.02, routing_strategy_="mixlora", jitter_noise_=0.0, num_experts_=s.experts,
        act_fn_=getattr(model.config, "hidden_act", "silu"), top_k_=s.top_k,
    )
    authors.inject_adapter_in_model(model, config, weights)
    params: list[torch.Tensor] = []
    lora_modules = []
    for layer in model.model.layers:
        lora_modules += [getattr(layer.self_attn, p) for p in ATTENTION]
        moe = layer.mlp.mixlora_moes["default"]
        moe.gate_ = moe.gate_.detach().clone()  # their router: a plain tensor, made a leaf the optimizer can own
        params.append(moe.gate_)
        lora_modules += list(moe.experts_.values())
    for m in lora_modules:
        if s.dropout == 0:
            m.dropout_ = nn.Identity()
        params += [m.lora_A.weight, m.lora_B.weight]
    return Variant("authors-mixlora", model.train(), params)


BUILDERS: dict[str, Callable[[nn.Module, BenchSettings, dict], Variant]] = {
    "peft-lora": build_peft_lora,
    "loramix-lora": build_loramix_lora,
    "loramix-mixlora": _loramix_builder("loramix-mixlora", "mixlora"),
    "loramix-mixlora-naive": _loramix_builder("loramix-mixlora-naive", "mixlora", dispatch="naive"),
    "authors-mixlora": build_authors_mixlora,
    "loramix-mixlora-recompute": _loramix_builder("loramix-mixlora-recompute", "mixlora", recompute_experts=True),
    "loramix-mixlora-fused": _loramix_builder("loramix-mixlora-fused", "mixlora", fused=True),
    "loramix-mixlora-eager": _loramix_builder("loramix-mixlora-eager", "mixlora", native_kernel=False),
    "loramix-loramoe": _loramix_builder("loramix-loramoe", "loramoe"),
    "loramix-mola": _loramix_builder("loramix-mola", "mola"),
    "loramix-mola-dense": _loramix_builder("loramix-mola-dense", "mola", dispatch="dense"),
    "loramix-hydralora": _loramix_builder("loramix-hydralora", "hydralora"),
}
