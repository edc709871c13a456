"""save_adapter / load_adapter: round trip, file contents, and clear errors on bad folders."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loramix
from loramix.adapters.folder import read_adapter_folder
from loramix.modules import LoraLinear, MixLoraFFN
from conftest import mixlora_config, perturb_adapter, saved_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

CASES = {
    "llama-mixdora": ("llama", lambda: mixlora_config(use_dora=True, attention_r=2, attention_alpha=4)),
    "gpt2-mixlora-top_p": ("gpt2", lambda: mixlora_config(routing="top_p", top_p=0.6)),
    "phi3-mixlora-switch": ("phi3", lambda: mixlora_config(routing="switch", ffn_targets=["down_proj"])),
    "qwen3-lora": ("qwen3", lambda: loramix.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])),
    "gemma2-dora": ("gemma2", lambda: loramix.LoraConfig(r=4, alpha=8, targets=None, use_dora=True, use_rslora=True)),
}


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def assert_no_adapter(model):
    assert not hasattr(model, "loramix_adapter")
    assert not any(isinstance(m, (LoraLinear, MixLoraFFN)) for m in model.modules())


@pytest.mark.parametrize("case", sorted(CASES))
def test_save_reseed_load_reproduces_logits(tmp_path, case):
    family, make_config = CASES[case]
    ids, mask, labels = batch()
    model = loramix.inject(tiny_model(family), make_config())
    perturb_adapter(model, seed=2, b_std=0.2, router_std=0.5)
    expected = logits_of(model, ids, mask)
    assert (expected - logits_of(tiny_model(family), ids, mask)).abs().max() > 1e-3  # the adapter matters
    folder = loramix.save_adapter(model, tmp_path / "out" / "adapter", extra={"tasks": ["arc-e"]})

    torch.manual_seed(12345)  # a different RNG state: a fresh adapter's init would differ
    fresh = tiny_model(family)  # same base weights (seeded), no adapter
    base_keys = set(fresh.state_dict())
    loaded = loramix.load_adapter(fresh, folder)
    assert loaded is fresh
    assert (logits_of(loaded, ids, mask) - expected).abs().max() <= 1e-6
    assert loaded.loramix_adapter.config == model.loramix_adapter.config
    params = loramix.adapter_parameters(loaded)
    assert all(p.requires_grad for p in params.values())

    # The file holds exactly the adapter tensors, equal to the trained ones, and no base tensor
    # (plain LoRA/DoRA under PEFT's key names: the reader gives them back in loramix's).
    tensors = read_adapter_folder(folder).tensors
    for key, tensor in tensors.items():
        assert torch.equal(tensor, loramix.adapter_parameters(model)[key].detach())
    assert set(tensors) == set(loramix.adapter_parameters(model))
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        assert len(set(f.keys())) == len(tensors) and not set(f.keys()) & base_keys
    meta = loramix.adapters.read_adapter_config(folder)
    assert meta["model_family"] == family and meta["extra"] == {"tasks": ["arc-e"]}
    sidecar = ["loramix_config.json"] if meta["kind"] == "lora" else []
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", *sidecar]


def test_recorded_base_model_is_read_from_whichever_file_records_it(tmp_path):
    # read_adapter_config's base_model (what the exports, loramix serve and loramix export read): loramix's
    # own name first, else PEFT's base_model_name_or_path, else None.
    model = loramix.inject(tiny_model("llama"), loramix.LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    model.config._name_or_path = "org/tiny-llama"
    folder = loramix.save_adapter(model, tmp_path / "adapter")
    assert loramix.adapters.read_adapter_config(folder)["base_model"] == "org/tiny-llama"
    sidecar = folder / "loramix_config.json"
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "base_model": None}))
    assert loramix.adapters.read_adapter_config(folder)["base_model"] == "org/tiny-llama"  # PEFT's file says it
    assert read_adapter_folder(folder).base_model == "org/tiny-llama"
    _, mixlora = saved_adapter(tmp_path / "mix" / "adapter")
    config = mixlora / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model": None, "base_model_name_or_path": None}))
    assert loramix.adapters.read_adapter_config(mixlora)["base_model"] is None


def test_adapter_for_other_shapes_names_key_and_shapes(trained_adapter):
    folder = trained_adapter
    other = tiny_model("llama", intermediate_size=64)
    with pytest.raises(loramix.AdapterLoadError) as err:
        loramix.load_adapter(other, folder)
    message = str(err.value)  # one message naming both bases and the first shape that differs
    assert "trained on base model" in message and "other shapes" in message
    assert "mlp.down_proj" in message and "(32, 64)" in message and "(32, 48)" in message
    assert_no_adapter(other)  # a failed load leaves the model as it was


def test_adapter_for_other_family_is_refused(trained_adapter):
    folder = trained_adapter
    other = tiny_model("qwen2")
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_config\.json.*'llama'.*'qwen2'"):
        loramix.load_adapter(other, folder)
    assert_no_adapter(other)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupted_safetensors_names_the_file(trained_adapter, damage):
    folder = trained_adapter
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00\xffnot a safetensors file" * 10, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    model = tiny_model("llama")
    with pytest.raises(loramix.AdapterLoadError, match=str(path).replace(".", r"\.")):
        loramix.load_adapter(model, folder)
    assert_no_adapter(model)


def test_missing_or_extra_tensor_is_named(trained_adapter):
    folder = trained_adapter
    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dropped = "model.layers.1.mlp.router.weight"
    del tensors[dropped]
    tensors["model.layers.9.mlp.router.weight"] = torch.zeros(4, 32)
    save_file(tensors, str(path))
    with pytest.raises(loramix.AdapterLoadError, match=rf"{dropped}.*model\.layers\.9\.mlp\.router\.weight"):
        loramix.load_adapter(tiny_model("llama"), folder)


def test_unknown_key_in_saved_config_names_key_and_suggestion(trained_adapter):
    folder = trained_adapter
    path = folder / "adapter_config.json"
    meta = json.loads(path.read_text())
    meta["config"]["num_expert"] = meta["config"].pop("num_experts")
    path.write_text(json.dumps(meta))
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_config\.json.*'num_expert'.*Did you mean 'num_experts'"):
        loramix.load_adapter(tiny_model("llama"), folder)


def test_missing_config_and_bad_json_name_the_file(tmp_path, trained_adapter):
    folder = trained_adapter
    (folder / "adapter_config.json").unlink()
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_config\.json: missing"):
        loramix.load_adapter(tiny_model("llama"), folder)
    (folder / "adapter_config.json").write_text('{"format": "loramix-adapter",\n "kind": mixlora}')
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_config\.json: not valid JSON \(line 2"):
        loramix.load_adapter(tiny_model("llama"), folder)
    with pytest.raises(loramix.AdapterLoadError, match="no such adapter folder"):
        loramix.load_adapter(tiny_model("llama"), tmp_path / "nowhere")
    (folder / "adapter_config.json").write_text(json.dumps({"model_type": "llama"}))  # a model's config.json
    with pytest.raises(loramix.AdapterLoadError, match="not a loramix adapter"):
        loramix.load_adapter(tiny_model("llama"), folder)


def test_missing_weights_file_is_named(trained_adapter):
    folder = trained_adapter
    (folder / "adapter_model.safetensors").unlink()
    model = tiny_model("llama")
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_model\.safetensors: missing"):
        loramix.load_adapter(model, folder)
    assert_no_adapter(model)


def test_save_overwrites_and_requires_an_adapter(tmp_path):
    model, folder = saved_adapter(tmp_path / "adapter")
    perturb_adapter(model, seed=3)
    loramix.save_adapter(model, folder)  # replacing an existing adapter is fine (atomic rename)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ids, mask, _ = batch()
    reloaded = loramix.load_adapter(tiny_model("llama"), folder)
    torch.testing.assert_close(logits_of(reloaded, ids, mask), logits_of(model, ids, mask), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="no loramix adapter"):
        loramix.save_adapter(tiny_model("llama"), tmp_path / "x")
