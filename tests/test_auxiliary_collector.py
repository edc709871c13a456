"""The one channel for auxiliary losses (``modules/auxiliary.py``): each adapter module records its losses into
its forward's collector (``context.losses``), and the model's hook, ``adapter_losses``, ``AdapterView`` and the
thin reader ``models.losses.auxiliary_losses`` all read that collector; a forward reads only its own losses, and a
checkpoint's recompute records nothing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loramix
from conftest import mixlora_config, perturb_adapter
from loramix.models.inject import adapter_state, moe_layers
from loramix.models.losses import auxiliary_losses
from loramix.models.many import AdapterView, adapter_losses, inject_many
from loramix.modules import ForwardContext, LoraMoeLinear
from tiny_models import batch, tiny_model


def test_a_forward_reads_only_its_own_losses_not_an_earlier_forwards():
    """Modules kept their last call's loss as attributes: a MixLoRA adapter that got no row in this forward still
    handed its previous forward's load balance to ``auxiliary_losses``. Each forward now opens its own collector."""
    model = inject_many(tiny_model("llama", seed=0), {"mix": mixlora_config(), "lora": loramix.LoraConfig(r=4)})
    model.train()
    ids, mask, _ = batch()
    mix = list(model.loramix_many.members["mix"].values())
    model(input_ids=ids, attention_mask=mask, adapter_rows=[("mix", 3)])
    assert set(auxiliary_losses(mix)) == {"aux_loss", "z_loss"}
    model(input_ids=ids, attention_mask=mask, adapter_rows=[("lora", 3)])  # no row of "mix": it computes nothing
    assert auxiliary_losses(mix) == {}
    assert model.loramix_many.adapters["mix"].context.losses.collect() == {}


def test_the_hook_and_every_reader_get_the_same_tensors_the_mean_of_what_each_module_recorded():
    ids, mask, labels = batch()
    model = loramix.inject(tiny_model("llama", seed=0), mixlora_config(aux_loss_coef=0.5)).train()
    perturb_adapter(model, seed=2, router_std=1.0)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    losses = adapter_state(model).context.losses
    raw = losses.collect(out.logits)
    assert raw["aux_loss"] is out.aux_loss and raw["z_loss"] is out.z_loss  # one channel: no second collection
    for name in ("aux_loss", "z_loss"):
        per_layer = [losses.recorded(m)[name] for m in moe_layers(model)]
        assert len(per_layer) == len(model.model.layers)
        torch.testing.assert_close(raw[name], sum(per_layer) / len(per_layer), rtol=1e-6, atol=0)
    assert float(raw["aux_loss"]) > 0.5  # Switch loss: 1 when balanced, so a real value, not a zero placeholder

    joint = inject_many(tiny_model("llama", seed=0), {"mix": mixlora_config(aux_loss_coef=0.5),
                                                      "lora": loramix.LoraConfig(r=4)}).train()
    view = AdapterView(joint, "mix")
    out = view(input_ids=ids, attention_mask=mask, labels=labels)
    collector = joint.loramix_many.adapters["mix"].context.losses
    entry = adapter_losses(joint, out.logits, labels, [("mix", 3)])["mix"]
    assert entry["aux_loss"] is out.aux_loss is collector.collect()["aux_loss"]


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpoints_recompute_records_nothing(reentrant):
    """The recompute inside backward keeps the first forward's losses (a loss recorded there would hold a graph that
    is never differentiated); under reentrant checkpointing it only ties their gradient (``modules/auxiliary.py``)."""
    ids, mask, labels = batch()
    model = loramix.inject(tiny_model("llama", seed=0), mixlora_config(aux_loss_coef=0.5)).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    losses = adapter_state(model).context.losses
    kept = {m: losses.recorded(m) for m in moe_layers(model)}
    assert all(v["aux_loss"].requires_grad != reentrant for v in kept.values())  # reentrant: recorded without grad
    out.loss.backward()
    for module, values in kept.items():
        assert all(losses.recorded(module)[name] is value for name, value in values.items())
        assert module.router.weight.grad.abs().sum() > 0


def test_a_module_called_on_its_own_without_grad_then_with_grad_records_each_call():
    """Outside a model no forward opens a collector: a call with grad after one without is a new call, not a
    reentrant checkpoint's recompute (which would refuse, the loss never having been collected)."""
    context = ForwardContext()
    config = loramix.LoraMoeConfig(r=2, alpha=4, dropout=0.0, num_experts=4, tasks=["a", "b"])
    layer = LoraMoeLinear(nn.Linear(4, 4), config, context=context)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        layer(x)
    assert not context.losses.recorded(layer)["balance_loss"].requires_grad
    layer(x)
    assert context.losses.recorded(layer)["balance_loss"].requires_grad
