"""The authors' MixLoRA adapter format (``mixlora`` 0.2.3): loramix gives the same logits as their package."""

from __future__ import annotations

import json

import pytest
import torch

import loramix
from loramix.models import moe_layers
from tiny_models import batch, tiny_model

mixlora_pkg = pytest.importorskip("mixlora", reason="the authors' package mixlora==0.2.3 is installed by `make install`")

pytestmark = pytest.mark.usefixtures("single_thread")

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
FFN = ["gate_proj", "up_proj", "down_proj"]
# The families their package supports, beyond llama: fused (phi3) and plain with biases (phi).
FAMILY_TARGETS = {
    "phi3": (["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"], "silu"),
    "phi": (["q_proj", "k_proj", "v_proj", "dense"], ["fc1", "fc2"], "gelu_new"),
}


def authors_weights(model, num_experts: int, r: int, targets: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the authors' keys (shapes as nn.Linear: A (r, in), B (out, r))."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer_idx, layer in enumerate(model.model.layers):
        for name in targets:
            block = "mlp" if hasattr(layer.mlp, name) else "self_attn"
            out_f, in_f = getattr(getattr(layer, block), name).weight.shape
            heads = [f"mixlora.layers.{layer_idx}.self_attn.{name}"] if block == "self_attn" else [
                f"mixlora.layers.{layer_idx}.mlp.{name}.experts.{e}" for e in range(num_experts)]
            for key in heads:
                weights[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / in_f**0.5
                weights[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.2
        hidden = model.config.hidden_size
        weights[f"mixlora.layers.{layer_idx}.mlp.moe_gate.weight"] = torch.randn(num_experts, hidden, generator=g)
    return weights


def write_authors_folder(folder, weights, **config) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "peft_type": "MIXLORA", "routing_strategy": "mixlora", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-llama", "num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 8,
        "lora_dropout": 0.05,  # their LoraLinear asserts dropout > 0
        "act_fn": "silu", "target_modules": ATTENTION + FFN, "router_aux_loss_coef": 0.01,
    }
    meta.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    torch.save(weights, folder / "adapter_model.bin")


def authors_model(folder, family: str = "llama"):
    """A tiny model with the authors' package's adapter loaded, put in eval mode by hand."""
    model = tiny_model(family)
    config, weights = mixlora_pkg.load_adapter_weights(str(folder), adapter_name="default", device="cpu",
                                                       dtype=torch.float32)
    mixlora_pkg.inject_adapter_in_model(model, config, weights)
    model.eval()  # the attention LoraLinears are registered submodules
    for layer in model.model.layers:  # their expert LoraLinears live in a plain dict
        for moe in layer.mlp.mixlora_moes.values():
            for lora in moe.experts_.values():
                lora.eval()
    return model


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True},
                                     {"target_modules": {"q_proj": True, "v_proj": True, "k_proj": False,
                                                         "up_proj": True, "down_proj": True}}],
                         ids=["lora", "rslora", "dora", "dict-targets"])
def test_authors_adapter_matches_their_package(tmp_path, variant):
    targets = variant.get("target_modules", ATTENTION + FFN)
    if isinstance(targets, dict):
        targets = [t for t, on in targets.items() if on]
    weights = authors_weights(tiny_model("llama"), num_experts=4, r=4, targets=targets)
    folder = tmp_path / "authors"
    write_authors_folder(folder, weights, **variant)

    ids, mask, _ = batch(size=3, length=10)
    ours = loramix.load_adapter(tiny_model("llama"), folder)
    theirs = authors_model(folder)
    with torch.no_grad():
        base = tiny_model("llama")(input_ids=ids, attention_mask=mask).logits
        ours_logits = ours(input_ids=ids, attention_mask=mask).logits
        theirs_logits = theirs(input_ids=ids, attention_mask=mask).logits
    # They route padding tokens through the experts too; real tokens never attend to padding, so the
    # logits of real tokens must agree.
    real = mask.bool()
    assert (ours_logits[real] - base[real]).abs().max() > 1e-2  # the adapter changes the model
    assert (ours_logits[real] - theirs_logits[real]).abs().max() <= 1e-5

    cfg = ours.loramix_adapter.config
    assert (cfg.num_experts, cfg.top_k, cfg.r, cfg.routing) == (4, 2, 4, "top_k")
    assert cfg.aux_loss_coef == 0.01
    assert sorted(cfg.attention_targets + cfg.ffn_targets) == sorted(targets)


@pytest.mark.parametrize("family", sorted(FAMILY_TARGETS))
def test_authors_adapter_matches_their_package_on_phi_families(tmp_path, family):
    attention, ffn, act_fn = FAMILY_TARGETS[family]
    weights = authors_weights(tiny_model(family), num_experts=4, r=4, targets=attention + ffn)
    folder = tmp_path / "authors"
    write_authors_folder(folder, weights, target_modules=attention + ffn, act_fn=act_fn, top_k=3)
    ids, mask, _ = batch(size=3, length=10)
    real = mask.bool()
    ours = loramix.load_adapter(tiny_model(family), folder)
    theirs = authors_model(folder, family)
    with torch.no_grad():
        base = tiny_model(family)(input_ids=ids, attention_mask=mask).logits[real]
        ours_logits = ours(input_ids=ids, attention_mask=mask).logits[real]
        theirs_logits = theirs(input_ids=ids, attention_mask=mask).logits[real]
    assert (ours_logits - base).abs().max() > 1e-2
    assert (ours_logits - theirs_logits).abs().max() <= 1e-5


def test_expert_lora_overrides_expert_settings(tmp_path):
    model = tiny_model("llama")
    weights = authors_weights(model, num_experts=4, r=4, targets=["q_proj"])
    g = torch.Generator().manual_seed(1)
    for layer_idx in range(2):  # experts of rank 2 on down_proj only
        for e in range(4):
            key = f"mixlora.layers.{layer_idx}.mlp.down_proj.experts.{e}"
            weights[f"{key}.lora_A.weight"] = torch.randn(2, 48, generator=g)
            weights[f"{key}.lora_B.weight"] = torch.randn(32, 2, generator=g)
    folder = tmp_path / "authors"
    write_authors_folder(folder, weights, target_modules=["q_proj", "down_proj"],
                         expert_lora={"r": 2, "lora_alpha": 6, "lora_dropout": 0.05})
    loramix.load_adapter(model, folder)
    moe = moe_layers(model)[0]
    assert moe.r == 2 and moe.scale == 3.0 and moe.targets == ["down_proj"]
    q = model.model.layers[0].self_attn.q_proj
    assert q.r == 4 and q.scale == 2.0
    torch.testing.assert_close(moe.experts.lora_B["down_proj"][3], weights["mixlora.layers.0.mlp.down_proj.experts.3.lora_B.weight"])


class _Marker:
    """Unpickling this would open (create) a file: proof that arbitrary code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    weights = authors_weights(tiny_model("llama"), num_experts=4, r=4, targets=["q_proj"])
    weights["mixlora.layers.0.mlp.moe_gate.weight"] = _Marker(str(marker))
    folder = tmp_path / "authors"
    write_authors_folder(folder, weights, target_modules=["q_proj"])
    model = tiny_model("llama")
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_model\.bin: cannot be read as a weights-only"):
        loramix.load_adapter(model, folder)
    assert not marker.exists()
    assert not hasattr(model, "loramix_adapter")


def test_authors_folder_errors_name_the_problem(tmp_path):
    model = tiny_model("llama")
    weights = authors_weights(model, num_experts=4, r=4, targets=["q_proj", "gate_proj"])
    folder = tmp_path / "authors"
    # An expert missing.
    broken = {k: v for k, v in weights.items() if ".experts.3." not in k}
    write_authors_folder(folder, broken, target_modules=["q_proj", "gate_proj"])
    with pytest.raises(loramix.AdapterLoadError, match=r"experts \[0, 1, 2\], expected 0\.\.3"):
        loramix.load_adapter(model, folder)
    # A key that is not MixLoRA's.
    write_authors_folder(folder, {**weights, "base_model.lm_head.weight": torch.zeros(3)},
                         target_modules=["q_proj", "gate_proj"])
    with pytest.raises(loramix.AdapterLoadError, match=r"unexpected entry 'base_model\.lm_head\.weight'"):
        loramix.load_adapter(model, folder)
    # A target this family does not have.
    write_authors_folder(folder, weights, target_modules=["q_proj", "fc1"])
    with pytest.raises(loramix.AdapterLoadError, match=r"\['fc1'\].*'llama'"):
        loramix.load_adapter(model, folder)
    # Wrong shapes (saved for a larger model).
    big = dict(weights)
    big["mixlora.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
    write_authors_folder(folder, big, target_modules=["q_proj", "gate_proj"])
    with pytest.raises(loramix.AdapterLoadError, match=r"q_proj\.lora_A' has shape \(4, 64\).*\(4, 32\)"):
        loramix.load_adapter(model, folder)
    # An expert activation other than the FFN's (their experts would apply it; ours use the FFN's).
    write_authors_folder(folder, weights, target_modules=["q_proj", "gate_proj"], act_fn="relu")
    with pytest.raises(loramix.AdapterLoadError, match=r"act_fn 'relu' is not this model's FFN activation"):
        loramix.load_adapter(model, folder)
    # Garbage instead of a pickle, not a state dict at all, and a missing weights file.
    (folder / "adapter_model.bin").write_bytes(b"not a pickle at all" * 3)
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_model\.bin: cannot be read"):
        loramix.load_adapter(model, folder)
    torch.save([torch.zeros(2)], folder / "adapter_model.bin")
    with pytest.raises(loramix.AdapterLoadError, match="expected a state dict, found list"):
        loramix.load_adapter(model, folder)
    (folder / "adapter_model.bin").unlink()
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_model\.bin: missing"):
        loramix.load_adapter(model, folder)
    assert not hasattr(model, "loramix_adapter")
