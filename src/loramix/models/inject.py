"""Turn a Hugging Face causal LM into an adapter model in place, and back.

``inject(model, config)`` freezes every base parameter, swaps the targeted modules for loramix
modules (``LoraLinear`` on projections, ``MixLoraFFN`` on FFN blocks) and installs two hooks on the
model: a pre-hook that hands the attention mask (padding) and task ids to every adapted module, and
a post-hook that, in training mode, adds the weighted auxiliary losses (MixLoRA's load balance and
z-loss, MoRE's contrastive loss) to the loss the trainer differentiates, also under reentrant activation
checkpointing (see ``_add_auxiliary_losses`` and ``modules/auxiliary.py``; the sum itself is written
once, in ``models/losses.py``). In eval mode ``out.loss`` is the LM loss alone.
``model.save_pretrained(folder)`` of an injected model writes the adapter folder, not the base.

Example:
    >>> model = inject(AutoModelForCausalLM.from_pretrained(path), MixLoraConfig())
    >>> out = model(input_ids=ids, attention_mask=mask, labels=labels)
    >>> out.loss, out.aux_loss   # training mode: LM + coef · aux; aux_loss: mean load balance over the MoE layers
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ..modules import ForwardContext, adapter_modules, frozen_weight, is_quantized, kind_of, moe_layers
from ..modules import more_modules  # noqa: F401  (its public name here since before the kinds)
from ..modules.kinds import layer_sites
from ..modules.quantized import keep_4bit_layout
from .footprint import check_adapter_fits
from . import losses
from .losses import IGNORE_INDEX, answer_tokens, compose_loss
from .quantize import compute_dtype, dense_linear, dequantize_model, quantization_of
from .registry import ModelFamily, decoder_layers, family_of

# Called with the model at the end of ``inject`` and at the start of ``unload``. The transformers-facing
# parts (``model.save_pretrained`` writing the adapter folder, the Trainer log callback) need the adapter
# writer, a layer above this one: ``integrations/hf.py`` registers them here when ``loramix`` is imported
# (the package root imports it), so this module never imports upward.
ON_INJECT: list[Callable[[nn.Module], None]] = []
ON_UNLOAD: list[Callable[[nn.Module], None]] = []


@dataclass
class AdapterState:
    """What loramix attaches to an injected model as ``model.loramix_adapter``."""

    config: Any
    family: ModelFamily
    context: ForwardContext
    hooks: list = field(default_factory=list)
    # Weight of this forward's auxiliary losses: the call's share n_b / N of the optimizer step's label
    # tokens when the caller passes ``num_items_in_batch=N`` (transformers Trainer does), else None (= 1).
    loss_weight: torch.Tensor | float | None = None
    # name → [sum, count] of the raw auxiliary losses of the training forwards since the last log
    # (detached, on the model's device: no host sync per step); read and reset by ``pop_logged_losses``.
    logged: dict = field(default_factory=dict)


def adapter_state(model: nn.Module) -> AdapterState:
    """The ``AdapterState`` of an injected model; a clear error if the model has none."""
    state = getattr(model, "loramix_adapter", None)
    if state is None:
        raise ValueError("this model has no loramix adapter: call loramix.inject(model, config) or load_adapter first")
    return state


def check_fresh_base(model: nn.Module) -> None:
    """Refuse a model no injection or load can start from: ``load_model``'s (model, tokenizer) pair, or a model that
    already has loramix adapters (one from ``inject`` / ``load_adapter``, several from ``inject_many`` /
    ``load_many``), whose adapted modules a second injection would wrap again."""
    if isinstance(model, tuple):  # else "model family 'None' is not supported", which hides the cause
        raise TypeError("inject() and load_adapter() take the model, got a tuple: loramix.hub.load_model returns "
                        "(model, tokenizer); unpack it: model, tokenizer = loramix.hub.load_model(...)")
    if getattr(model, "loramix_adapter", None) is not None:
        raise ValueError("this model already has a loramix adapter; unload() it first or load into a fresh model")
    many = getattr(model, "loramix_many", None)
    if many is not None:
        raise ValueError(f"this model already has loramix adapters ({', '.join(many.adapters)}); "
                         "start from a fresh base model")


_ALONE = "adapter"  # the name ``inject`` gives its one config in ``check_injection``


def check_injection(model: nn.Module, configs: Mapping[str, Any]) -> tuple[ModelFamily, dict[str, list]]:
    """Every check of an injection, for all of ``configs`` (adapter name → config) before the model is touched:
    ``inject`` asks it for its one config, ``inject_many`` for all of them, so a bad second adapter fails before
    the first is built.

    Checks: a fresh base (``check_fresh_base``); each config a registered kind's, passing the kind's own checks;
    a model of a registered family; the modules each replaces in that family; each adapter fitting in memory to
    train (``check_adapter_fits``). An error about one adapter of several has a note naming it.

    Returns:
        (the model's family, adapter name → its sites per decoder layer, ``modules.kinds.layer_sites``).
    """
    check_fresh_base(model)
    for name, config in configs.items():
        with _naming(name, len(configs)):
            kind_of(config).check(config)  # kind_of: a TypeError naming the config classes
    family = family_of(model)
    num_layers = len(decoder_layers(model, family))
    sites = {}
    for name, config in configs.items():
        with _naming(name, len(configs)):
            sites[name] = layer_sites(config, family, num_layers)
            check_adapter_fits(model, config)  # before anything is allocated: names adapter.r / num_experts
    return family, sites


@contextlib.contextmanager
def _naming(name: str, count: int) -> Iterator[None]:
    """An error raised in the block gets the note "(adapter 'name')" when there are several adapters."""
    try:
        yield
    except Exception as err:
        if count > 1:
            err.add_note(f"(adapter '{name}')")
        raise


def inject(model: nn.Module, config: Any) -> nn.Module:
    """Add a loramix adapter (the config of a registered kind: ``LoraConfig``, ``MixLoraConfig``, ``MoreConfig``)
    to a transformers causal LM of a registered family (e.g. a ``LlamaForCausalLM``), in place; base weights are
    frozen. The kind says which modules of each decoder layer it replaces and how (``modules/kinds.py``).

    Returns the same model object. Its forward accepts the usual arguments (and ``task_ids`` for MoRE);
    with ``labels`` its ``loss`` includes the weighted auxiliary losses in training mode (``losses.compose_loss``;
    in eval mode it is the LM loss, and the raw auxiliary losses are on the output in both).
    """
    family, planned = check_injection(model, {_ALONE: config})
    layers, sites = decoder_layers(model, family), planned[_ALONE]
    context = ForwardContext()

    for p in model.parameters():
        p.requires_grad_(False)
    keep_4bit_layout(model)  # a bitsandbytes CPU repack, undone before state_dict() would corrupt it
    for layer, in_layer in zip(layers, sites):
        for site in in_layer:
            layer.set_submodule(site.path, site.build(layer.get_submodule(site.path), context))

    # New modules are born in training mode. Give each the mode of the module it replaced, so that
    # an eval-mode model stays deterministic (adapter dropout off) until the caller calls .train().
    for _, module in adapter_modules(model):
        module.train(module.replaced.training)

    state = AdapterState(config=config, family=family, context=context)
    state.hooks.append(model.register_forward_pre_hook(_capture_inputs(state), with_kwargs=True))
    state.hooks.append(model.register_forward_hook(_add_auxiliary_losses, with_kwargs=True))
    model.loramix_adapter = state
    for hook in ON_INJECT:
        hook(model)
    return model


def _label_count(kwargs: dict) -> torch.Tensor | None:
    """Label tokens of this call that a causal LM loss counts (after the one-token shift), or None."""
    shifted = kwargs.get("shift_labels")
    if isinstance(shifted, torch.Tensor):
        return (shifted != IGNORE_INDEX).sum()
    labels = kwargs.get("labels")
    if isinstance(labels, torch.Tensor) and labels.dim() >= 2:
        return answer_tokens(labels)
    return None


def call_token_mask(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The (B, T) bool padding mask of a forward call (its ``attention_mask``, by keyword or second), or None."""
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _capture_inputs(state: AdapterState):
    context = state.context

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        context.begin_forward()  # this forward's auxiliary-loss collector
        context.token_mask = call_token_mask(args, kwargs)
        context.task_ids = kwargs.pop("task_ids", None)
        # transformers Trainer passes N = num_items_in_batch (label tokens of the whole optimizer step) and
        # sums the micro-batch losses; the LM loss is then sum(CE) / N. The auxiliary losses get the same
        # share n_b / N, so one optimizer step weighs them the same whatever the accumulation.
        items = kwargs.get("num_items_in_batch")
        count = _label_count(kwargs) if items is not None else None
        if count is not None:  # (Trainer's DataParallel path hands each replica N as a (1, 1) tensor: take the number)
            items = torch.as_tensor(items, device=count.device).reshape(-1)[0].clamp(min=1)
        state.loss_weight = None if count is None else count / items
        return args, kwargs

    return hook


def auxiliary_losses(model: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Mean load-balance loss and mean router z-loss over the MoE layers of the last forward (read from the
    forward's collector, ``modules/auxiliary.py``)."""
    raw = losses.auxiliary_losses(moe_layers(model))
    return raw.get("aux_loss"), raw.get("z_loss")


def _add_auxiliary_losses(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    """Post-hook: put ``coef · L_aux`` into the loss whichever way the trainer computes it.

    The weighted sum ``A = Σ coef · L_aux`` (load balance, z, contrastive; ``losses.compose_loss``) joins:

    - ``output.loss`` (and ``output[0]`` with ``return_dict=False``) when the call has labels, as
      ``loss + w · A`` with ``w = n_b / num_items_in_batch`` when the caller passes
      ``num_items_in_batch`` (transformers ``Trainer``: it sums the micro-batch losses), else ``w = 1``
      (one batch, or a trainer that averages micro-batches itself). Whatever the trainer then does to
      this scalar (÷ accumulation steps, × world size, fp16 loss scaling) applies to ``A`` as well.
    - ``output.log_probs`` of TRL's fused LM head (``model(..., fused_lm_head=True)``, SFTTrainer's
      default): TRL never reads ``output.loss`` but differentiates ``-Σ log_probs / N``. Every label
      position gets ``-(A - A.detach())``: the values are unchanged, and the gradient is that of
      ``(n_b / N) · A``, the same share as above, again under whatever scaling TRL applies.

    The raw values are set as ``output.aux_loss`` / ``z_loss`` / ``contrastive_loss`` and, for a
    training forward, accumulated for the trainer's logs (``pop_logged_losses``). In eval mode
    (``model.eval()``) nothing is added: ``output.loss`` is the LM loss (perplexity), the raw values
    are still set. Under reentrant activation checkpointing the layers' losses have no graph of their own:
    their gradient reaches them through the output (``_anchor``, ``modules/auxiliary.py``), so every
    route above stays exact.
    """
    state = module.loramix_adapter
    if state.context.disabled:
        return output
    raw = state.context.losses.collect(_anchor(output))  # what the modules recorded in this forward
    if not raw:
        return output
    weighted = compose_loss(None, raw, state.config)  # A = Σ coef · L_aux (None: every weight is 0)
    if module.training and torch.is_grad_enabled():
        for name, value in raw.items():
            entry = state.logged.setdefault(name, [0.0, 0])
            entry[0], entry[1] = entry[0] + value.detach().float(), entry[1] + 1
    has_labels = kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None
    w = 1.0 if state.loss_weight is None else state.loss_weight

    if isinstance(output, tuple):  # return_dict=False: (loss, logits, ...) when labels were given
        if (weighted is None or not module.training or not has_labels or not isinstance(output[0], torch.Tensor)
                or output[0].dim() != 0):
            return output
        return (compose_loss(output[0], raw, state.config, share=w), *output[1:])
    for name, value in raw.items():
        setattr(output, name, value)
    if weighted is None or not module.training:
        return output
    if has_labels and getattr(output, "loss", None) is not None:  # Trainer: Σ CE / N + (n_b / N) · A
        output.loss = compose_loss(output.loss, raw, state.config, share=w)
    log_probs, label_mask = getattr(output, "log_probs", None), getattr(output, "label_mask", None)
    if isinstance(log_probs, torch.Tensor) and isinstance(label_mask, torch.Tensor) and log_probs.requires_grad:
        zero_valued = (weighted - weighted.detach()).to(log_probs.dtype)
        output.log_probs = log_probs - zero_valued * label_mask.to(log_probs.dtype)
    return output


def _anchor(output: Any) -> torch.Tensor | None:
    """A tensor of the model's output computed after every layer, that backward goes through: the logits
    (TRL's fused head: the log-probs; else the loss). The collector (``modules/auxiliary.py``) ties the auxiliary
    losses' gradient to it under reentrant activation checkpointing."""
    names = ("logits", "log_probs", "loss")
    values = output if isinstance(output, tuple) else [getattr(output, name, None) for name in names]
    return next((v for v in values if isinstance(v, torch.Tensor) and v.requires_grad), None)


def pop_logged_losses(model: nn.Module) -> dict[str, float]:
    """Mean raw auxiliary losses of the training forwards since the last call (then reset); ``{}`` if none."""
    state = getattr(model, "loramix_adapter", None)
    if state is None or not state.logged:
        return {}
    means = {name: float(total) / count for name, (total, count) in state.logged.items() if count}
    state.logged.clear()
    return means


def router_stats(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Per routed adapter module (MixLoRA's FFN blocks; each LoRAMoE, MoLA, HydraLoRA projection), in module
    order, from its last forward that wrote them (a training forward or a plain no-grad call; not
    ``evaluate_multiple_choice`` or ``generate_text``, which skip them, ``inference_only_calls``): ``load`` (each
    expert's share of the routing, (E,)) and ``prob`` (mean router probability per expert, (E,)), over non-padding
    tokens (``AdapterModule.last_load``)."""
    return [{"load": m.last_load, "prob": m.last_prob} for _, m in adapter_modules(model) if m.last_load is not None]


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's trainable tensors by state-dict key (e.g. ``model.layers.0.mlp.router.weight``)."""
    params: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        if hasattr(module, "adapter_parameter_names"):
            for name in module.adapter_parameter_names():
                params[f"{prefix}.{name}" if prefix else name] = module.get_parameter(name)
    return params


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly its base function.

    Example:
        >>> with disable_adapters(model):
        ...     base_logits = model(input_ids=ids).logits
    """
    context = adapter_state(model).context
    previous, context.disabled = context.disabled, True
    try:
        yield model
    finally:
        context.disabled = previous


@contextlib.contextmanager
def inference_only_calls(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model's adapter skips what only training reads (``ForwardContext.inference_only``: the
    load-balance, z and contrastive losses, the routers' load statistics); the flag's previous value comes back
    after, also on an exception. The outputs are the same, bit for bit: no skipped value feeds them.

    For the frozen calls whose outputs are all their caller reads (``evaluate_multiple_choice``, ``generate_text``,
    lm-eval's calls through ``integrations.lm_eval.LoramixLM``).
    A model without a plain adapter (a bare base; a stacked model, ``inject_many``, or one adapter's view of it) is
    left as it is: there the flag also picks the grouped forms (``models/grouped.py``, ``mixlora_served.py``),
    whose outputs equal the per-adapter path's only up to the matmuls' summation order.

    Example:
        >>> with inference_only_calls(model), torch.no_grad():
        ...     logits = model(input_ids=ids).logits   # no auxiliary loss computed, router_stats unchanged
    """
    state = getattr(model, "loramix_adapter", None)
    if state is None or getattr(model, "loramix_many", None) is not None:
        yield model
        return
    context = state.context
    previous, context.inference_only = context.inference_only, True
    try:
        yield model
    finally:
        context.inference_only = previous


def _fold(base: nn.Module, delta: torch.Tensor, fan_in_fan_out: bool, dense_dtype: torch.dtype) -> nn.Module:
    """``base`` with ``delta`` (out, in) added to its weight; the module to put back into the model.

    A plain projection is updated in place. A quantized one (bitsandbytes, torchao) cannot hold
    ``W + ΔW`` without re-quantizing, which would round most of a small update away and fails on
    torchao's tensors (no in-place add): it is dequantized and comes back as a dense ``nn.Linear`` in
    ``dense_dtype`` (the model's compute dtype).
    """
    if is_quantized(base):
        return dense_linear(base, (frozen_weight(base).float() + delta.float()).to(dense_dtype))
    weight = base.weight
    weight += (delta.t() if fan_in_fan_out else delta).to(weight.dtype)
    return base


def _restore(model: nn.Module, delta_of: Callable[[nn.Module], torch.Tensor | None] | None) -> nn.Module:
    """Put the replaced modules back and remove the adapter; with ``delta_of``, first fold ``delta_of(module)``
    (out, in; None: nothing) into the weight of each adapted projection.

    On a quantized base a merge returns a dense model: every quantized projection is dequantized into
    an ``nn.Linear`` in the compute dtype (the adapted ones with their update added), and the
    quantization config is dropped, so ``save_pretrained`` writes a plain checkpoint.
    """
    state = adapter_state(model)
    merge = delta_of is not None
    quantized = merge and quantization_of(model) is not None
    dense_dtype = compute_dtype(model)
    replacements = []
    for name, module in adapter_modules(model):
        original = module.replaced
        if merge:
            with torch.no_grad():
                delta = delta_of(module)
                if delta is not None:
                    original = _fold(original, delta, module.fan_in_fan_out, dense_dtype)
        replacements.append((name, original))
    for name, original in replacements:
        model.set_submodule(name, original)
    for hook in state.hooks:
        hook.remove()
    for hook in ON_UNLOAD:
        hook(model)
    del model.loramix_adapter
    if quantized:  # the projections without an adapter too: one plain model, not a half-quantized one
        dequantize_model(model, dense_dtype)
    return model


def merge_and_unload(model: nn.Module, delta: Callable[[nn.Module], torch.Tensor | None] | None = None) -> nn.Module:
    """Fold the adapter into the base weights and return the plain transformers model.

    Args:
        delta: adapter module → the update (out, in) to add to the weight of the projection it replaced, or None;
            default: the module's own ``merged_delta()`` (LoRA/DoRA), after the kind's ``merge_refusal`` (MixLoRA,
            MoRE) raises. ``adapters.more_tasks.merge_task`` passes one MoRE task's update.
    """
    if delta is None:
        refusal = kind_of(adapter_state(model).config).merge_refusal
        if refusal:
            raise ValueError(refusal)
        delta = _merged_delta
    return _restore(model, delta)


def _merged_delta(module: nn.Module) -> torch.Tensor | None:
    return module.merged_delta()


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapter without merging; the base model is restored exactly."""
    return _restore(model, None)
