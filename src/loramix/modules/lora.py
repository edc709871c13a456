r"""LoRA on one frozen linear projection (LoRA, rsLoRA, DoRA).

::

        x ──────────────► W (frozen) ──────────────┐
        │                                          (+) ──► y        y = W x + s · B A dropout(x)
        └─► dropout ─► A (r×in) ─► B (out×r) ─► ×s ┘

    DoRA:  y = m ⊙ (W x + s B A x) / ||W + s B A||_row  (+ bias)
           m (out,) is learned; the norm is treated as a constant in backward (as in the DoRA paper).

The wrapper owns the frozen ``weight``/``bias`` Parameters of the module it replaces, so the base
model's state-dict keys do not change (``...q_proj.weight`` stays ``...q_proj.weight``) and the
adapter tensors sit beside them as ``lora_A``, ``lora_B`` and ``lora_magnitude``. A quantized
projection (bitsandbytes, torchao; ``quantized.py``) is called as the module it is.

Precision: the adapter tensors are fp32 next to a half-precision or quantized base
(``quantized.adapter_dtype_for``).
In the forward the LoRA branch runs in the dtype of the frozen output ``W x + b``: under
``torch.autocast`` that is the autocast dtype (``F.linear`` is on autocast's lower-precision list), on a
bf16 base without autocast bf16, else fp32; a quantized base returns what it returns (bitsandbytes:
the input's dtype, fp32 also under autocast). ``A`` and ``B`` are cast to it (their gradients arrive in
fp32 through the cast; under autocast the matmuls themselves run in the autocast dtype), and the
output has that dtype, as the replaced module would return. The DoRA norm ``||W + s B A||`` is computed
in fp32 and cast.

Inference (no gradient, no active dropout, no autocast, plain LoRA on an unquantized base: serving, evaluation,
``generate``): every decision above is fixed, so ``LoraLinear`` runs three kernels per call and nothing else,
``y = F.linear(x, W, b)``, ``low = x A'ᵀ``, ``y.addmm_(low, Bᵀ)``, with ``A'`` (``s A`` when the
scale is a power of two, where that fold is exact) and ``Bᵀ`` in the input's dtype kept while the weights are
unchanged. The numbers are the general path's, bit for bit (tests/test_lora_inference_path.py), except a decode
step's few fp32 rows on a CPU: ``native_linear``'s C kernels, which differ from ``F.linear`` by float rounding.
DoRA's (``dora_inference_output``): the same two matmuls, then ``dora_output``'s formula in place in its order of
operations, with the factor and the bias also kept; bit for bit too (tests/test_dora_more_inference_path.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from . import native_dropout, native_linear
from .context import ForwardContext
from .frozen_constant import FrozenConstant
from .kinds import AdapterKind, AdapterModule, Site, TensorRole, register, resolve_targets
from .quantized import adapter_dtype_for, frozen_weight, is_quantized, logical_shape

# Bound once: ``LoraLinear.forward``'s kept-factors check runs hundreds of times per decode step, where every
# attribute lookup shows.
_grad_enabled, _autocast_enabled = torch.is_grad_enabled, torch.is_autocast_enabled
_compiling = torch.compiler.is_compiling


def lora_factors(*shape: int, init: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Parameter, nn.Parameter]:
    """Fresh LoRA factors for ``shape = (*stack, r, in, out)``: A (*stack, r, in) and B (*stack, out, r).

    B starts at zero, so ``B A = 0`` and the adapter starts as the base. Each (r, in) slice of A is
    initialised on its own: 'kaiming' is PyTorch's Linear default (Kaiming-uniform, a=sqrt(5)),
    'gaussian' is N(0, 1/r). E.g. ``lora_factors(8, 4, 64, 32, ...)``: eight experts' (4, 64) and (32, 4).
    """
    *stack, rank, fan_in, fan_out = shape
    A = torch.empty(*stack, rank, fan_in, device=device, dtype=dtype)
    with torch.no_grad():
        for block in A.reshape(-1, rank, fan_in):
            if init == "kaiming":
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
            elif init == "gaussian":
                nn.init.normal_(block, std=1.0 / rank)
            else:
                raise ValueError(f"unknown LoRA init '{init}' (use 'kaiming' or 'gaussian')")
    return nn.Parameter(A), nn.Parameter(torch.zeros(*stack, fan_out, rank, device=device, dtype=dtype))


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when ``t`` has it already (a decode step makes hundreds of these)."""
    return t if t.dtype == dtype else t.to(dtype)


def exact_scale_fold(scale: float, dtype: torch.dtype) -> bool:
    """Whether ``F.linear(x, s A) == F.linear(x, A) * s`` bit for bit in ``dtype``: ``s`` a power of two between
    2⁻¹⁷ and 2¹⁶ (a multiply by it only moves the exponent, so it commutes with every rounding of the matmul) in a
    dtype with fp32's exponent range (fp32, bf16: 2¹²⁷ and 2⁻¹²⁶, which no product of a working model's activations
    and weights comes within 2¹⁷ of). fp16's range is too narrow for that: there the scale stays a multiply."""
    if dtype not in (torch.float32, torch.bfloat16) or not math.isfinite(scale) or scale <= 0:
        return False
    mantissa, exponent = math.frexp(scale)
    return mantissa == 0.5 and -16 <= exponent <= 17


def scaled_factors(A: torch.Tensor, B: torch.Tensor, scale: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float | None]:
    """``(A'ᵀ, Bᵀ, scale or None)`` in ``dtype``, detached, for an inference path's ``(x A'ᵀ) * scale`` (None: no
    multiply), equal bit for bit to the general path's ``F.linear(x, A) · s``: ``A' = s A`` where that fold is exact
    (``exact_scale_fold``), else ``A``; no multiply at all when ``s = 1``. Shapes: A (r, in), B (out, r) → A'ᵀ (in, r)
    and Bᵀ (r, out), transposed views."""
    A_in, B_in = in_dtype(A.detach(), dtype), in_dtype(B.detach(), dtype)
    if scale == 1.0:
        return A_in.t(), B_in.t(), None
    if exact_scale_fold(scale, dtype):
        return (A_in * scale).t(), B_in.t(), None
    return A_in.t(), B_in.t(), scale


def scaled_low(x: torch.Tensor, At: torch.Tensor, scale: float | None) -> torch.Tensor:
    """An inference path's rank-r rows ``(x A'ᵀ) * scale`` from ``scaled_factors``' ``A'ᵀ`` and scale (None: no
    multiply), bit for bit the general path's ``F.linear(x, A) · s`` (``torch.mm`` is the kernel ``F.linear``
    runs). Shapes: x (..., in), A'ᵀ (in, r) → (rows, r), rows the product of x's leading dimensions."""
    low = torch.mm(x.reshape(-1, x.shape[-1]), At)
    if scale is not None:
        low.mul_(scale)
    return low


def dora_weight_norm(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of ``W + s B A`` without materialising ``B A`` per expert.

    Shapes: weight (out, in), A (r, in) or stacked (E, r, in), B (out, r) or (E, out, r) → detached
    norms (out,) or (E, out), in the dtype of the adapter tensors (fp32 next to a bf16 base: a bf16
    norm would round the DoRA factor to 3 significant digits). Uses
        ``||W_o + s B_o A||² = ||W_o||² + 2 s B_o·(A W_oᵀ) + s² B_o (A Aᵀ) B_oᵀ``,
        which costs O(out·in·r) instead of O(out·in) per expert materialised.
    """
    with torch.no_grad():
        w = weight.float()
        a, b = A.float(), B.float()
        base_sq = (w * w).sum(-1)  # (out,)
        wa = torch.matmul(w, a.transpose(-1, -2))  # (..., out, r)
        cross = (b * wa).sum(-1)  # (..., out)
        gram = torch.matmul(a, a.transpose(-1, -2))  # (..., r, r)
        lora_sq = (torch.matmul(b, gram) * b).sum(-1)  # (..., out)
        norm_sq = base_sq + 2 * scale * cross + scale * scale * lora_sq
        return norm_sq.clamp_min(0).sqrt().to(A.dtype)


def merged_lora_weight(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float,
                       magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """The merged weight ``W + s B A`` (DoRA: ``m / ||W + s B A||_row ⊙ (W + s B A)``) in fp32: what merging a
    LoRA into its frozen weight computes, for ``LoraLinear.delta_weight`` and the exports.

    Shapes: weight (out, in), A (r, in), B (out, r), magnitude (out,) or None (plain LoRA) → (out, in). The
    DoRA norm is the forward's (``dora_weight_norm``), so the merged layer computes what the adapted one did.
    """
    weight = weight.float()
    merged = weight + scale * (B.float() @ A.float())
    if magnitude is None:
        return merged
    return (magnitude.float() / dora_weight_norm(weight, A, B, scale).float())[:, None] * merged


class LowRankRows(NamedTuple):
    """One adapter's term at a projection for ``rows`` rows of a frozen (no-grad, eval) forward, in the form
    several adapters of one slot share (``models.many`` runs their rows in one matmul pair):
    ``y = factor ⊙ (base_out + (x Aᵀ ⊙ coefficients) Bᵀ − bias) + bias``, where a None factor means 1.

    Attributes:
        A: (r, in). B: (out, r). coefficients: (rows, r), what multiplies each rank component per row (the
        scale, MoRE's per-task mask). factor: DoRA's ``m / ||W + s B A||`` (out,) or None. bias: the frozen
        bias (out,) or None (only read with a factor).
    """

    A: torch.Tensor
    B: torch.Tensor
    coefficients: torch.Tensor
    factor: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def dora_output(base_out: torch.Tensor, lora: torch.Tensor, bias: torch.Tensor | None,
                factor: torch.Tensor) -> torch.Tensor:
    """DoRA's ``factor ⊙ (W x + s B A x) + b`` from the frozen output ``base_out = W x + b``, in its dtype.

    Shapes: base_out and the LoRA term ``lora`` (..., out); bias (out,) or None; ``factor = m / ||W + s B A||``
    broadcasting to (..., out) (per row for MixLoRA's experts).
    """
    compute = base_out.dtype
    bias = 0 if bias is None else in_dtype(bias, compute)  # an fp32 bias would promote a bf16 output to fp32
    return in_dtype(factor, compute) * (base_out - bias + in_dtype(lora, compute)) + bias


class LoraDropout(nn.Dropout):
    """Inverted dropout on a LoRA input, with a cheaper mask on CPU.

    On CPU ``nn.Dropout`` draws one random number per element (``bernoulli_``), which costs as much
    as a rank-16 LoRA matmul. Here each element gets 15 random bits and is kept where they are >= a
    threshold: the drop probability is rounded to a multiple of 2⁻¹⁵ (0.05 → 0.049988) and the kept
    values are scaled by ``1 / (1 - p_used)``, so the expectation stays exact. The bits come from
    the C kernel of ``native_dropout.py`` (drawn and applied in one pass), else from one 64-bit
    ``random_()`` draw per four elements. Other devices use ``F.dropout``. Shapes: any → same.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masked, factor = self.masked(x)
        return masked if factor == 1.0 else masked * factor

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The dropped-out input *before* the ``1 / (1 - p)`` rescale, and that factor.

        A LoRA input only feeds ``A``, so callers fold the factor into the LoRA scale (a rank-r
        multiply) instead of paying a pass over the full input.
        """
        if not self.training or self.p == 0:
            return x, 1.0
        if x.device.type != "cpu" or x.dtype not in native_dropout.DTYPES:
            return F.dropout(x, self.p, True, self.inplace), 1.0
        threshold, factor = self.cpu_threshold()
        if threshold == 0:  # p < 2⁻¹⁶: rounds to no dropout at all
            return x, 1.0
        if native_dropout.applies(x):
            return native_dropout.dropped(x, threshold), factor
        return torch.where(self._torch_bits(x.shape, x.device) >= threshold, x, 0.0), factor

    def cpu_threshold(self) -> tuple[int, float]:
        """The CPU mask's threshold on 15 random bits (0: p rounds to no dropout) and the rescale it implies."""
        threshold = round(self.p * 32768)
        return threshold, 32768 / (32768 - threshold)

    def cpu_keep(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, float] | None:
        """The CPU mask of ``masked`` for an input of ``shape`` before it is applied, drawn as ``masked`` draws it
        (the same random numbers from the same generator state): (keep, bool ``shape``; the rescale), or None when
        p rounds to 0."""
        threshold, factor = self.cpu_threshold()
        if threshold == 0:
            return None
        if native_dropout.available(device):
            return native_dropout.keep_mask(shape, threshold), factor
        return self._torch_bits(shape, device) >= threshold, factor

    @staticmethod
    def _torch_bits(shape: torch.Size, device: torch.device) -> torch.Tensor:
        """15 random bits per element (int16, ``shape``) from ``random_()``: four lanes of each 64-bit draw."""
        n = math.prod(shape)
        lanes = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_()
        # random_() fills [0, 2⁶³): the top lane has only 15 random bits, so keep 15 bits of each lane.
        return lanes.view(torch.int16)[:n].view(shape) & 0x7FFF


def lora_input(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(masked x, factor)`` with ``dropout(x) == masked * factor``; see ``LoraDropout.masked``."""
    if type(dropout) is nn.Identity:  # no dropout configured: skip a module call per projection per step
        return x, 1.0
    if isinstance(dropout, LoraDropout):
        return dropout.masked(x)
    return dropout(x), 1.0


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  fan_in_fan_out: bool) -> torch.Tensor:
    """``x Wᵀ + b`` for an nn.Linear weight (out, in), or ``x W + b`` for a Conv1D weight (in, out).

    The Conv1D case is ``addmm`` as in transformers' ``Conv1D``: the same numbers, and under autocast
    the same output dtype (``x @ W + b`` would promote the bf16 product to fp32 with an fp32 bias). nn.Linear's:
    ``native_linear.linear`` (``F.linear``, or a decode step's few fp32 rows on a CPU in C)."""
    if fan_in_fan_out:
        if bias is None:
            return x @ weight
        return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])
    return native_linear.linear(x, weight, bias)


class FrozenProjection(AdapterModule):
    """The frozen projection that ``LoraLinear`` and ``MoreLinear`` wrap: its weight, bias and how to call it.

    Registers the base module's own ``weight``/``bias`` Parameters (quantized: the packed codes or the
    torchao tensor), so the base's parameter names and state-dict keys do not change; keeps the base
    module itself unregistered as ``replaced`` (for ``unload``, and to call a quantized base).

    Args:
        base: ``nn.Linear``, GPT-2 ``Conv1D``, or a quantized linear (see ``quantized.py``).
        fan_in_fan_out: the (unquantized) weight is stored (in, out), as in ``Conv1D``.
        context: the model's shared ``ForwardContext`` (task ids, padding mask, disabling); a fresh one if None.

    A subclass defines ``adapter_forward(x, base_out)``; ``forward`` calls it with the frozen output.
    """

    def __init__(self, base: nn.Module, fan_in_fan_out: bool, context: ForwardContext | None = None) -> None:
        super().__init__(base)
        self.fan_in_fan_out = fan_in_fan_out
        self.quantized = is_quantized(base)
        self.in_features, self.out_features = logical_shape(base, fan_in_fan_out)
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.context = context if context is not None else ForwardContext()
        params = self._parameters  # the inference paths read them here, skipping ``nn.Module.__getattr__``
        self._inference_capable = (not self.quantized and "weight" in params
                                   and (self.bias is None or "bias" in params))
        self._has_dropout = False  # the subclass's dropout, when it has one

    def inference_now(self, device_type: str) -> bool:
        """Whether a call on ``device_type`` can take the subclass's inference path: an unquantized base, no
        gradient, no active dropout, no autocast there, not traced by ``torch.compile``; there the general path's
        dtype, dropout and autocast decisions are all fixed (everything in the input's dtype, no mask)."""
        return (self._inference_capable and not torch.is_grad_enabled() and not (self.training and self._has_dropout)
                and not torch.is_autocast_enabled(device_type) and not torch.compiler.is_compiling())

    def weight_out_in(self) -> torch.Tensor:
        """The frozen weight as (out, in); dequantized afresh for a quantized base (``frozen_weight``)."""
        return frozen_weight(self.replaced, fan_in_fan_out=self.fan_in_fan_out)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b``, (..., in) → (..., out); a quantized base is called as a module."""
        if self.quantized:
            return self.replaced(x)
        return frozen_linear(x, self.weight, self.bias, self.fan_in_fan_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``adapter_forward(x, W x + b)``; ``W x + b`` alone while the context disables the adapters."""
        base_out = self.frozen(x)
        if self.context.disabled:
            return base_out
        return self.adapter_forward(x, base_out)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        """A quantized base saves itself (bitsandbytes adds its quantization statistics under
        ``weight.*`` / ``SCB``), so the frozen keys are exactly those of the model before ``inject``."""
        if not self.quantized:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        self.replaced._save_to_state_dict(destination, prefix, keep_vars)
        for name, param in self._parameters.items():
            if name not in ("weight", "bias") and param is not None:
                destination[prefix + name] = param if keep_vars else param.detach()


class LoraLinear(FrozenProjection):
    """A frozen linear projection plus a LoRA (or rsLoRA / DoRA) delta.

    ``base``, ``fan_in_fan_out`` and ``context`` as for ``FrozenProjection``; ``config`` the ``LoraConfig`` (its
    ``targets`` are for ``inject``, not this module). A quantized ``base`` (bitsandbytes ``Linear4bit`` /
    ``Linear8bitLt``, a torchao weight) is called as a module, the adapter is shaped from its logical
    (in, out) and DoRA dequantizes its weight for the norm on each use.

    Example:
        >>> layer = LoraLinear(nn.Linear(64, 32), LoraConfig(r=8, alpha=16, dropout=0.0))

    Shapes: input (..., in) → output (..., out).
    """

    def __init__(self, base: nn.Module, config: LoraConfig, *, fan_in_fan_out: bool = False,
                 context: ForwardContext | None = None) -> None:
        super().__init__(base, fan_in_fan_out, context)
        self.r = config.r
        self.scale = config.scale
        self.use_dora = config.use_dora
        self.dropout = LoraDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        dtype = adapter_dtype_for(base, config.adapter_dtype)
        self.lora_A, self.lora_B = lora_factors(self.r, self.in_features, self.out_features, init=config.init,
                                                device=self.weight.device, dtype=dtype)
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(self.weight_norm().to(dtype))
        self._dora_factor = FrozenConstant()  # m / ||W + s B A||, kept while the weights are frozen
        self._has_dropout = type(self.dropout) is not nn.Identity
        self._inference_factors = FrozenConstant()  # (A'ᵀ, Bᵀ, scale) of ``inference_factors``
        self._kept: tuple | None = None  # ``keep_inference_factors``: the last inference call's factors, for forward
        self._dora_inference_factors = FrozenConstant()  # DoRA's: (A'ᵀ, Bᵀ, scale, factor, bias)

    def weight_norm(self) -> torch.Tensor:
        """Detached row norms of ``W + s B A``, shape (out,)."""
        return dora_weight_norm(self.weight_out_in(), self.lora_A, self.lora_B, self.scale)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``s B A``, shape (out, in) (DoRA: the merged weight minus W, ``merged_lora_weight``)."""
        if not self.use_dora:
            return self.scale * (self.lora_B @ self.lora_A)
        weight = self.weight_out_in().float()  # dequantized once for a quantized base
        return merged_lora_weight(weight, self.lora_A, self.lora_B, self.scale, self.lora_magnitude) - weight

    def merged_delta(self) -> torch.Tensor:
        """What merging folds into the frozen weight: ``delta_weight()``, (out, in)."""
        return self.delta_weight()

    def reset_dora_magnitude(self) -> None:
        """DoRA: the magnitude set to the row norms of the current ``W + s B A``; nothing for plain LoRA."""
        if self.use_dora:
            with torch.no_grad():
                self.lora_magnitude.copy_(self.weight_norm())

    def inference_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
        """``(A'ᵀ, Bᵀ, scale or None)`` in ``dtype`` for the inference path, with ``(x A'ᵀ) * scale`` (None: no
        multiply; ``torch.mm`` on the rows, the kernel ``F.linear`` runs) equal bit for bit to the general path's
        ``F.linear(x, A) · s``: ``A' = s A`` where that fold is exact (``exact_scale_fold``), else ``A``. Shapes:
        A'ᵀ (in, r) and Bᵀ (r, out), transposed views.
        ``(None, None, None)`` when B is zero (a fresh adapter, the server's base stand-in): the term is skipped and
        the output is ``W x + b`` itself (the general path adds +0.0 to it: the same values; only an infinite
        activation, which the general path turns into NaN through ``0 · inf``, differs).

        Kept by a ``FrozenConstant`` while ``lora_A`` and ``lora_B`` are unchanged (an in-place write,
        ``load_state_dict``, ``.to()`` or a new ``.data`` computes them afresh).
        """
        params = self._parameters
        A, B = params["lora_A"], params["lora_B"]

        def compute() -> tuple[torch.Tensor | None, torch.Tensor | None, float | None]:
            factors = scaled_factors(A, B, self.scale, dtype)
            return factors if factors[1].any() else (None, None, None)

        return self._inference_factors.get((A, B), compute, (dtype,))

    def keep_inference_factors(self, x: torch.Tensor) -> tuple:
        """``inference_factors(x.dtype)`` with what they were computed from, for ``forward``'s check on later calls: (A,
        B, their versions and addresses, the dtype, the device type, the factors, ``fitting_transpose``'s Bᵀ or None)."""
        params = self._parameters
        A, B = params["lora_A"], params["lora_B"]
        factors = self.inference_factors(x.dtype)
        fused = (None if factors[0] is None or self.fan_in_fan_out
                 else native_linear.fitting_transpose(params["weight"], params.get("bias"), A, B))
        self._kept = (A, B, A._version, B._version, A.data_ptr(), B.data_ptr(), x.dtype, x.device.type, factors,
                      fused)
        return factors

    def inference_output(self, x: torch.Tensor, base_out: torch.Tensor, *, in_place: bool,
                         factors: tuple | None = None) -> torch.Tensor:
        """The inference path's ``base_out + s B A x`` from ``inference_factors`` (x (..., in), base_out (..., out)
        in the same dtype); ``in_place``: written into ``base_out``, which must be the caller's own tensor.
        ``factors``: ``inference_factors(x.dtype)`` already at hand."""
        At, Bt, scale = factors if factors is not None else self.inference_factors(x.dtype)
        if At is None:  # B = 0
            return base_out
        low = scaled_low(x, At, scale)  # (rows, r)
        if in_place:  # a view of it is fine: F.linear's output is contiguous
            base_out.view(-1, base_out.shape[-1]).addmm_(low, Bt)
            return base_out
        return torch.addmm(base_out.reshape(-1, base_out.shape[-1]), low, Bt).view(base_out.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b + s B A x`` (DoRA: see the module docstring); ``W x + b`` while the context disables adapters.

        Inference (``inference_now``: serving, evaluation, ``generate``) takes a lean path with the same numbers as the
        general one: ``F.linear(x, W, b)``, ``x A'ᵀ`` (its scale folded in where exact) and the LoRA term added into
        that fresh frozen output by ``addmm_``, with no per-call casts, checks or temporaries beyond those. Its
        factors are kept from the last such call (``keep_inference_factors``) and taken after one inline check: the
        same A and B objects at the same version and storage, the same input dtype, and the inference path's own
        conditions (in a one-row decode step the Python of a general check costs as much as the two LoRA kernels).
        A decode step's few fp32 rows on a CPU: the whole projection in one C call (``native_linear``).
        """
        kept = self._kept
        if kept is not None and not _grad_enabled():
            A, B, A_version, B_version, A_storage, B_storage, dtype, device_type, factors, fused = kept
            params = self._parameters
            if (x.dtype is dtype and params["lora_A"] is A and params["lora_B"] is B and A._version == A_version
                    and B._version == B_version and A.data_ptr() == A_storage and B.data_ptr() == B_storage
                    and not self.context.disabled and not (self.training and self._has_dropout)
                    and not _autocast_enabled(device_type) and not _compiling()):
                weight, bias = params["weight"], params.get("bias")
                out = None if fused is None else native_linear.kept_lora_linear(x, weight, bias, A, fused, self.scale)
                if out is not None:  # a decode step's rows: the whole projection in one C pass
                    return out
                out = frozen_linear(x, weight, bias, self.fan_in_fan_out)
                return self.inference_output(x, out, in_place=True, factors=factors)
        if self.inference_now(x.device.type) and not self.context.disabled:
            params = self._parameters
            out = frozen_linear(x, params["weight"], params.get("bias"), self.fan_in_fan_out)
            if self.use_dora:
                return self.dora_inference_output(x, out, in_place=True)
            return self.inference_output(x, out, in_place=True, factors=self.keep_inference_factors(x))
        return super().forward(x)

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Adapted output given the frozen output ``base_out = W x + b`` (both (..., in/out))."""
        if x.dtype == base_out.dtype and self.inference_now(base_out.device.type):
            # The inference path on a frozen output computed elsewhere (``AdapterStack`` runs it once for every
            # adapter's rows): not written in place.
            if self.use_dora:
                return self.dora_inference_output(x, base_out, in_place=False)
            return self.inference_output(x, base_out, in_place=False)
        # Everything runs in the dtype of the frozen output (see "Precision" above): the small adapter
        # matrices are cast to it, never the activations to fp32. Under autocast x may be fp32 while
        # base_out is bf16; the matmul would cast x anyway, so casting once first changes nothing.
        compute = base_out.dtype
        A, B = in_dtype(self.lora_A, compute), in_dtype(self.lora_B, compute)
        # The scale goes on the rank-r intermediate, not on the (..., out) product.
        x_in, factor = lora_input(self.dropout, in_dtype(x, compute))
        low = F.linear(x_in, A) * (self.scale * factor)  # x Aᵀ (F.linear: the same numbers, one op fewer)
        if not self.use_dora:
            device = base_out.device.type
            if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != compute:
                # A quantized base under autocast may return fp32 (bitsandbytes returns the input's dtype):
                # a fused addmm would round that output to the autocast dtype; add the LoRA term instead.
                return base_out + low @ B.t()
            # base_out + low Bᵀ as one fused matmul-add: no extra pass over the (..., out) output.
            out = torch.addmm(base_out.reshape(-1, base_out.shape[-1]), low.reshape(-1, low.shape[-1]), B.t())
            return out.view(base_out.shape)
        return dora_output(base_out, F.linear(low, B), self.bias, self.dora_factor())

    def dora_inference_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float | None,
                                                                   torch.Tensor, torch.Tensor | None]:
        """DoRA's inference path in ``dtype``: ``(A'ᵀ, Bᵀ, scale or None)`` of ``scaled_factors``, then
        ``m / ||W + s B A||`` and the frozen bias (out,) cast as ``dora_output`` casts them; kept while W, b, A, B and
        m are unchanged."""
        params = self._parameters
        weight, bias, A, B = params["weight"], params.get("bias"), params["lora_A"], params["lora_B"]
        tensors = (weight, A, B, params["lora_magnitude"]) + (() if bias is None else (bias,))

        def compute() -> tuple[torch.Tensor, torch.Tensor, float | None, torch.Tensor, torch.Tensor | None]:
            At, Bt, scale = scaled_factors(A, B, self.scale, dtype)
            kept_bias = None if bias is None else in_dtype(bias.detach(), dtype)
            return At, Bt, scale, in_dtype(self.dora_factor(), dtype), kept_bias

        return self._dora_inference_factors.get(tensors, compute, (dtype,))

    def dora_inference_output(self, x: torch.Tensor, base_out: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """DoRA's inference path: ``dora_output``'s ``factor ⊙ (base_out − b + s B A x) + b`` with its order of
        operations (so its roundings, bit for bit), from ``dora_inference_factors``. x (..., in) and base_out
        ``W x + b`` (..., out) in the same dtype; ``in_place``: written into ``base_out``, which must be the caller's
        own contiguous tensor."""
        At, Bt, scale, factor, bias = self.dora_inference_factors(x.dtype)
        # (rows, out), what the general path's F.linear(low, B) computes
        lora = torch.mm(scaled_low(x, At, scale), Bt)
        flat = base_out.view(-1, base_out.shape[-1]) if in_place else base_out.reshape(-1, base_out.shape[-1])
        if bias is None:  # the general path's - 0 and + 0 change no value
            out = flat.add_(lora) if in_place else flat + lora
            return out.mul_(factor).view(base_out.shape)
        out = flat.sub_(bias) if in_place else flat - bias
        return out.add_(lora).mul_(factor).add_(bias).view(base_out.shape)

    def low_rank_rows(self, rows: int, dtype: torch.dtype) -> LowRankRows | None:
        """This adapter as ``LowRankRows`` for ``rows`` rows in ``dtype``; None while dropout is active."""
        if self.training and type(self.dropout) is not nn.Identity:
            return None
        A, B = in_dtype(self.lora_A, dtype), in_dtype(self.lora_B, dtype)
        factor = in_dtype(self.dora_factor(), dtype) if self.use_dora else None
        return LowRankRows(A, B, A.new_full((rows, self.r), self.scale), factor, self.bias)

    def dora_factor(self) -> torch.Tensor:
        """DoRA's ``m / ||W + s B A||_row``, shape (out,): computed once and kept while the weight, A, B and m
        are unchanged and need no gradient (serving, evaluation; ``FrozenConstant``), else afresh."""
        tensors = (self.weight, self.lora_A, self.lora_B, self.lora_magnitude)
        return self._dora_factor.get(tensors, lambda: self.lora_magnitude / self.weight_norm())

    @staticmethod
    def tensor_names(use_dora: bool) -> list[str]:
        """The adapter tensors of a LoRA projection, relative to it, known without one (a file's expected keys):
        ['lora_A', 'lora_B'], and 'lora_magnitude' with DoRA."""
        return ["lora_A", "lora_B"] + (["lora_magnitude"] if use_dora else [])

    def adapter_parameter_names(self) -> list[str]:
        """Names (relative to this module) of the trainable adapter tensors."""
        return self.tensor_names(self.use_dora)

    def extra_repr(self) -> str:
        kind = "dora" if self.use_dora else "lora"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, {kind}"


# ============================================================================================ the kind
# A LoRA's tensors in a file: A (R, in), B (out, R), DoRA's magnitude (out,); R is the config's rank.
LORA_ROLES = (TensorRole("A", "lora_A", ("R", None), ("", "in")), TensorRole("B", "lora_B", (None, "R"), ("out", "")),
              TensorRole("M", "lora_magnitude", (None,), ("out",)))


def projection_sites(chosen: dict[str, set[str]], tensors: list[str], build, elements,
                     fan_in_fan_out: bool) -> list[Site]:
    """One ``Site`` per chosen projection (block → projection names; sorted within a block, blocks in order).

    Args:
        tensors: the replacement's adapter tensors. build: (projection, context) → its adapter module.
        elements: (in, out) of a projection → (its adapter elements, the config's ``adapter_dtype``); they live
            beside the projection, in ``adapter_dtype_for(projection, adapter_dtype)``.
        fan_in_fan_out: the family stores its weights (in, out) (GPT-2's Conv1D).
    """
    def footprint(module: nn.Module) -> tuple[int, nn.Module, torch.dtype]:
        count, dtype = elements(*logical_shape(module, fan_in_fan_out))
        return count, module, adapter_dtype_for(module, dtype)

    return [Site(f"{block}.{p}", tuple(tensors), build, footprint) for block, ps in chosen.items() for p in sorted(ps)]


def lora_sites(config: LoraConfig, chosen: dict[str, set[str]], family) -> list[Site]:
    """``LoraLinear`` sites on the chosen projections (also MixLoRA's attention LoRAs, with its attention config)."""
    def build(base: nn.Module, context: ForwardContext) -> LoraLinear:
        return LoraLinear(base, config, fan_in_fan_out=family.fan_in_fan_out, context=context)

    def elements(n_in: int, n_out: int) -> tuple[int, str | None]:
        return config.r * (n_in + n_out) + (n_out if config.use_dora else 0), config.adapter_dtype

    return projection_sites(chosen, LoraLinear.tensor_names(config.use_dora), build, elements, family.fan_in_fan_out)


class LoraKind(AdapterKind):
    """Plain LoRA / rsLoRA / DoRA: a ``LoraLinear`` on each targeted projection; merges; saved as a PEFT LoRA."""

    name, title, config_class = "lora", "LoRA", LoraConfig
    roles = LORA_ROLES
    size_settings = ("r",)
    rank_setting = "r"
    export_refusals = {"mixtral": "format 'mixtral' exports MixLoRA adapters; this is a 'lora' adapter "
                                  "(use --format peft or --format merged)"}

    def sites(self, config: LoraConfig, family) -> list[Site]:
        blocks = {family.attention: family.attention_projections, family.ffn: family.ffn_projections}
        return lora_sites(config, resolve_targets(config.targets, blocks, "targets", family), family)

    def sizes(self, config: LoraConfig, family, module: str) -> dict[str, tuple[str, int]]:
        return {"R": ("r", config.r)}


register(LoraKind())
