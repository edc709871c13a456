r"""Quantized frozen bases (QLoRA): load a base model in 4 or 8 bits, prepare it for adapter training,
dequantize it again for merging and export.

One name per scheme, used by the training config (``quantization: nf4``), ``loramix bench
--quantization`` and ``loramix eval/generate --quantization``, all through ``hub.load_model``::

    nf4          bitsandbytes 4-bit NormalFloat, blocks of 64 weights, one fp32 absmax per block (QLoRA)
    nf4-double   nf4 with the absmax values quantized again to 8 bits ("double quantization")
    int8         bitsandbytes LLM.int8 (per-row int8 weights; outlier features kept in 16 bits)
    torchao-int8 torchao int8 weight-only (per-row scale)
    torchao-int4 torchao int4 weight-only, groups of 32 input features: on CUDA the tinygemm layout
                 (needs bf16), elsewhere int4 values stored one per byte (IntxWeightOnlyConfig: the
                 int8 memory of torchao-int8, with int4 precision; no packed int4 CPU kernel on x86)

Bytes per weight (persistent): fp32 4, bf16 2, int8 ≈ 1 (+ one fp32 scale per row), nf4 ≈ 0.5 + 4/64
(absmax per block of 64), nf4-double ≈ 0.5 + 1/64 + 4/(64·256).

The projections stay quantized modules; loramix's adapter modules call them as modules and keep
their own tensors in the compute dtype (``loramix.modules.quantized``). Embeddings, norms and
``lm_head`` are not quantized (transformers keeps them out of every scheme).

``prepare_kbit_training`` is what PEFT's ``prepare_model_for_kbit_training`` does that applies here:
freeze every base tensor; cast the normalisation weights that are in fp16/bf16 to fp32 (their
outputs feed every quantized matmul; PEFT casts *every* non-quantized parameter, loramix leaves the
embeddings and ``lm_head`` in the load dtype: they are frozen, the loss already upcasts the logits
to fp32, and a fp32 embedding would silently turn off bf16 autocast in the training loop); with
gradient checkpointing, make the embedding output require grad. One CPU-specific step: bitsandbytes
repacks a 4-bit weight into an AVX512-BF16 layout on the first eval-mode forward, with bf16 block
scales (≈2e-3 logit change on a tiny Llama), and the repack fails for layers narrower than the
block size; loramix turns that repack off (and ``inject`` undoes one that already happened, on a
model loaded by transformers directly: ``modules.quantized.keep_4bit_layout``) so that training,
evaluation and the dequantized merge all see the same weights.

Example:
    >>> model, tok = hub.load_model("smollm2-135m", quantization="nf4")   # quantized + prepared
    >>> quantization_of(model)
    'nf4'
    >>> plain = dequantize_model(model)        # nn.Linear everywhere, fp32 (the compute dtype)
"""

from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..config import ConfigError
from ..modules.quantized import keep_4bit_layout

QUANTIZATIONS = ("nf4", "nf4-double", "int8", "torchao-int8", "torchao-int4")
# Input features per int4 group (torchao-int4); every quantized projection's in_features must be a multiple.
INT4_GROUP_SIZE = 32


def check_quantization(name: str | None, where: str = "quantization") -> str | None:
    """``name`` normalised (lower case; '', 'none', 'null' → None), or a ``ConfigError`` listing the choices."""
    key = "" if name is None else str(name).strip().lower()
    if key in ("", "none", "null", "no", "false"):
        return None
    if key not in QUANTIZATIONS:
        raise ConfigError(f"'{where}' must be one of {', '.join(QUANTIZATIONS)} or null, got {name!r}")
    return key


def add_quantization_argument(parser: Any) -> None:
    """``--quantization SCHEME`` on an argparse parser (or group): ``loramix bench/eval/generate`` load their
    base through ``hub.load_model(..., quantization=args.quantization)``, as ``loramix train`` does with
    the config key. Bad names are reported by ``check_quantization`` when the model loads."""
    parser.add_argument("--quantization", default=None, metavar="SCHEME",
                        help=f"quantize the frozen base while loading it: {', '.join(QUANTIZATIONS)} (default: none); "
                             "--dtype is then the compute dtype")


def quantization_config(name: str, *, compute_dtype: torch.dtype, device: torch.device | str) -> Any:
    """The ``BitsAndBytesConfig`` or ``TorchAoConfig`` (for ``from_pretrained(quantization_config=...)``) of
    scheme ``name``; ``compute_dtype`` is what the quantized matmuls compute in, ``device`` where the model
    will live (torchao-int4 picks its layout from it)."""
    name = check_quantization(name)
    if name in ("nf4", "nf4-double", "int8"):
        from transformers import BitsAndBytesConfig

        if name == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=name == "nf4-double",
                                  bnb_4bit_compute_dtype=compute_dtype)
    from transformers import TorchAoConfig

    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if torch.device(device).type == "cuda":
        from torchao.quantization import Int4WeightOnlyConfig

        if compute_dtype != torch.bfloat16:
            raise ConfigError("quantization 'torchao-int4' on CUDA uses torchao's tinygemm kernel, which needs "
                              "bf16: set dtype: bf16 (or use nf4 / torchao-int8)")
        return TorchAoConfig(Int4WeightOnlyConfig(group_size=INT4_GROUP_SIZE, int4_packing_format="tile_packed_to_4d"))
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup

    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP_SIZE)))


def _check_int4_shapes(source: str) -> None:
    """torchao-int4 needs every quantized projection's input width to be a multiple of the group size;
    checked on a meta-device copy of the model (no memory) so the error names the layer, not a
    conversion traceback."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and module.in_features % INT4_GROUP_SIZE:
            raise ConfigError(
                f"quantization 'torchao-int4' quantizes groups of {INT4_GROUP_SIZE} input features, but {name} of "
                f"{source} has {module.in_features}: use torchao-int8 or nf4 for this model")


_LOGGED: set[str] = set()


def _once(record: logging.LogRecord) -> bool:
    """A log filter that lets each message through once (bitsandbytes' int8 matmul warns on every call)."""
    seen = str(record.msg) in _LOGGED
    _LOGGED.add(str(record.msg))
    return not seen


def load_quantized(source: str, name: str, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """``from_pretrained(source)`` (a folder or a Hub id; ``hub.load_model`` resolves loramix's names) with
    the scheme ``name`` applied while loading on ``device``, in compute dtype ``dtype`` (also that of the
    unquantized parameters), then prepared (``prepare_kbit_training``: base tensors frozen)."""
    from transformers import AutoModelForCausalLM

    name = check_quantization(name)
    if name in ("nf4", "nf4-double", "int8"):
        import bitsandbytes  # noqa: F401  (a clear ImportError here rather than inside from_pretrained)

        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_once)
    else:
        import torchao  # noqa: F401
    if name == "torchao-int4":
        _check_int4_shapes(source)
    config = quantization_config(name, compute_dtype=dtype, device=device)
    device_map = {"": device.index if device.type == "cuda" and device.index is not None else str(device)}
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, quantization_config=config,
                                                 device_map=device_map)
    return prepare_kbit_training(model)


def quantization_of(model: nn.Module) -> str | None:
    """The loramix scheme name of a quantized transformers model, ``"other"`` for a quantization loramix did
    not name (e.g. GPTQ), or None for a plain model."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    method = get("quant_method", "")
    method = str(getattr(method, "value", method)).lower()  # a QuantizationMethod enum or its string
    if "bitsandbytes" in method:
        if get("load_in_8bit", False):
            return "int8"
        return "nf4-double" if get("bnb_4bit_use_double_quant", False) else "nf4"
    if "torchao" in method:
        quant_type = get("quant_type", None)
        text = type(quant_type).__name__ if not isinstance(quant_type, dict) else str(quant_type)
        return "torchao-int8" if "Int8" in text else "torchao-int4"
    return "other"


def _is_subclass_tensor(t: torch.Tensor) -> bool:
    """A torchao-style tensor subclass (its data lives in inner tensors named by ``__tensor_flatten__``)."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def storage_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """The plain tensors that hold a (possibly quantized) parameter: itself for a plain tensor; the packed
    data plus the block scales (and the nested scales of double quantization) for a bitsandbytes 4-bit
    weight; data plus per-row scales for 8-bit; the inner tensors of a torchao subclass. Used to count
    memory (``loramix bench``) and to check that training leaves the frozen weights byte-identical."""
    if _is_subclass_tensor(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            yield from storage_tensors(getattr(t, n))
        return
    yield t.data if isinstance(t, nn.Parameter) else t
    state = getattr(t, "quant_state", None)  # bitsandbytes Params4bit: block scales (+ nested, double quantization)
    nested = getattr(state, "state2", None)
    for holder, attr in ((state, "absmax"), (state, "code"), (state, "offset"), (nested, "absmax"), (nested, "code"),
                         (t, "SCB")):  # SCB: bitsandbytes Int8Params, one fp32 scale per row
        inner = getattr(holder, attr, None)
        if isinstance(inner, torch.Tensor):
            yield inner


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith("norm") or "rmsnorm" in name


def prepare_kbit_training(model: nn.Module, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Get a quantized base ready for adapter training, in place (also harmless on a plain model); returns it.

    - every base parameter frozen;
    - normalisation weights in fp16/bf16 cast to fp32 (see the module docstring for why only those);
    - bitsandbytes' CPU eval-mode repack of 4-bit weights turned off, and undone where it happened
      (``keep_4bit_layout``: exactness and small layers);
    - with ``gradient_checkpointing``: ``enable_gradient_checkpointing(model)``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if _is_norm(module):
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.float()
    keep_4bit_layout(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on non-reentrant activation checkpointing for a transformers model, in place.

    Non-reentrant: works with frozen inputs and keyword arguments, and restores the RNG. The embedding
    output is made to require grad (what PEFT does for reentrant checkpointing; harmless otherwise) and
    the KV cache is turned off (checkpointing recomputes the forward).
    """
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a quantized model computes in (the dtype it was loaded with), else its first float parameter's."""
    dtype = getattr(model.config, "dtype", None) if hasattr(model, "config") else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    for p in model.parameters():
        if p.is_floating_point() and not _is_subclass_tensor(p):
            return p.dtype
    return torch.float32


def dense_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """A plain ``nn.Linear`` with ``weight`` (out, in) and ``module``'s bias, on the weight's device."""
    bias = getattr(module, "bias", None)
    with torch.device("meta"):
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    dense.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        dense.bias = nn.Parameter(bias.detach().to(device=weight.device, dtype=weight.dtype), requires_grad=False)
    dense.train(module.training)
    return dense


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantized projection by an ``nn.Linear`` holding its dequantized weight in ``dtype``
    (default: ``compute_dtype(model)``), in place, and drop the quantization markers, so the result is a
    plain transformers model (``save_pretrained`` writes a dense checkpoint that loads without
    bitsandbytes or torchao). The model must have no loramix adapter (``unload``/``merge_and_unload`` first).
    """
    from ..modules.quantized import frozen_weight, is_quantized

    if getattr(model, "loramix_adapter", None) is not None:
        raise ValueError("dequantize_model: this model has a loramix adapter; call loramix.merge_and_unload(model) "
                         "(which dequantizes) or loramix.unload(model) first")
    dtype = dtype or compute_dtype(model)
    targets = [(name, m) for name, m in model.named_modules() if is_quantized(m)]
    with torch.no_grad():
        for name, module in targets:
            model.set_submodule(name, dense_linear(module, frozen_weight(module).to(dtype)))
    # What marks the model as quantized goes too, as in transformers' own dequantize, so that
    # save_pretrained writes a plain config.
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        with contextlib.suppress(AttributeError):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    return model


def dense_state(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, Callable[[], torch.Tensor]]:
    """The model's state dict as a dense model would have it: key → a function giving the tensor.

    A quantized projection's ``weight`` entry gives its dequantized (out, in) weight in ``dtype``
    (default: the compute dtype), made when asked for (an export holds one at a time); the entries
    that only describe its quantization (bitsandbytes' ``weight.absmax``, ``weight.quant_map``, ...,
    ``SCB``, ``weight_format``) are left out. Works on an injected model too: the adapter modules
    share the frozen weight of the projection they replaced, which is dequantized through that
    original module.
    """
    from ..modules import adapter_modules
    from ..modules.quantized import frozen_weight, is_quantized

    dtype = dtype or compute_dtype(model)
    owners: dict[int, nn.Module] = {}
    originals = [module.replaced for _, module in adapter_modules(model)]
    for module in originals + list(model.modules()):  # the replaced originals first: they hold the 8-bit scales
        if is_quantized(module):
            owners.setdefault(id(module.weight), module)
    state = model.state_dict(keep_vars=True)
    prefixes = [key[: -len("weight")] for key, value in state.items() if key.endswith("weight") and id(value) in owners]
    # bitsandbytes' quantization statistics of those weights: <prefix>weight.absmax, ..., <prefix>SCB, ...
    statistics_prefixes = tuple(f"{prefix}weight." for prefix in prefixes)
    statistics_keys = {f"{prefix}{leaf}" for prefix in prefixes for leaf in ("SCB", "weight_format")}
    out: dict[str, Callable[[], torch.Tensor]] = {}
    for key, value in state.items():
        if key.endswith("weight") and id(value) in owners:
            out[key] = lambda owner=owners[id(value)]: frozen_weight(owner).to(dtype)
        elif not (key.startswith(statistics_prefixes) or key in statistics_keys):
            out[key] = lambda value=value: value.detach()
    return out


def plain_config(config: Any) -> Any:
    """A copy of a model config without ``quantization_config`` (for a dense export of a quantized model)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config
