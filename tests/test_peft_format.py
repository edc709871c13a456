"""A loramix LoRA/DoRA/rsLoRA folder is a standard PEFT adapter; MixLoRA/MoRE folders tell PEFT what
they are; loramix still reads its old format and PEFT folders written by PEFT itself."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import save_file

import loramix
from conftest import mixlora_config, perturb_adapter, saved_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

LORA_CASES = {
    "llama-lora": ("llama", dict(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])),
    "llama-dora-rslora": ("llama", dict(r=4, alpha=8, targets=None, use_dora=True, use_rslora=True)),
    "gpt2-lora": ("gpt2", dict(r=2, alpha=6, targets=None, dropout=0.1)),  # Conv1D: fan_in_fan_out
    "qwen2-dora": ("qwen2", dict(r=4, alpha=4, targets=["q_proj", "o_proj", "up_proj"], use_dora=True)),
}


def logits_of(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def saved(tmp_path, family, config, name="adapter"):
    return saved_adapter(tmp_path / name, config, family=family, seed=3, b_std=0.3)


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_peft_loads_a_loramix_lora_folder_with_the_same_logits(tmp_path, case):
    family, values = LORA_CASES[case]
    ids, mask, _ = batch()
    model, folder = saved(tmp_path, family, loramix.LoraConfig(**values))
    expected = logits_of(model, ids, mask)
    assert (expected - logits_of(tiny_model(family), ids, mask)).abs().max() > 1e-3  # the adapter matters

    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == values["r"] and config["lora_alpha"] == values["alpha"]
    assert config["use_dora"] == values.get("use_dora", False)
    assert config["use_rslora"] == values.get("use_rslora", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(tiny_model(family), str(folder)).eval()
    assert not [w for w in caught if "Unexpected keyword" in str(w.message)]  # PEFT's "upgrade PEFT" warning
    assert isinstance(theirs.peft_config["default"], peft.LoraConfig)
    torch.testing.assert_close(logits_of(theirs, ids, mask), expected, atol=1e-5, rtol=0)

    # PEFT's view and loramix's agree tensor by tensor (after PEFT's own renaming).
    ours = loramix.adapter_parameters(model)
    theirs_state = peft.get_peft_model_state_dict(theirs)
    assert len(theirs_state) == len(ours)
    for key, value in theirs_state.items():
        module = key.removeprefix("base_model.model.").rsplit(".", 2)[0] if not key.endswith("vector") \
            else key.removeprefix("base_model.model.").rsplit(".", 1)[0]
        name = "lora_magnitude" if key.endswith("lora_magnitude_vector") else key.rsplit(".", 2)[1]
        assert torch.equal(value, ours[f"{module}.{name}"].detach())

    # And loramix reads the same folder back exactly, with its full config.
    again = loramix.load_adapter(tiny_model(family), folder)
    assert again.loramix_adapter.config == model.loramix_adapter.config
    torch.testing.assert_close(logits_of(again.eval(), ids, mask), expected, atol=0, rtol=0)


def test_loramix_reads_a_lora_folder_written_by_peft(tmp_path):
    ids, mask, _ = batch()
    cfg = peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "down_proj"], use_dora=True,
                          init_lora_weights="gaussian")
    theirs = peft.get_peft_model(tiny_model("llama"), cfg)
    perturb_adapter({name: p for name, p in theirs.named_parameters() if p.requires_grad}, seed=6, b_std=0.2)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits_of(theirs, ids, mask)

    ours = loramix.load_adapter(tiny_model("llama"), tmp_path / "peft").eval()
    config = ours.loramix_adapter.config
    assert (config.r, config.alpha, config.use_dora, config.targets) == (4, 12, True, ["down_proj", "q_proj"])
    torch.testing.assert_close(logits_of(ours, ids, mask), expected, atol=1e-5, rtol=0)

    # A PEFT variant loramix's LoRA does not compute is refused by name, not loaded wrong.
    path = tmp_path / "peft" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers_to_transform": [0]}))
    with pytest.raises(loramix.AdapterLoadError, match=r"adapter_config\.json: 'layers_to_transform' = \[0\] is not "
                       r"supported by loramix's LoRA; load this adapter with peft"):
        loramix.load_adapter(tiny_model("llama"), tmp_path / "peft")


@pytest.mark.parametrize("kind", ["mixlora", "more"])
def test_peft_on_a_mixlora_or_more_folder_says_what_it_is(tmp_path, kind):
    config = mixlora_config() if kind == "mixlora" else loramix.MoreConfig(max_rank=4, tasks=["a", "b"], dropout=0.0)
    _, folder = saved(tmp_path, "llama", config)
    with pytest.raises(KeyError) as err:
        peft.PeftModel.from_pretrained(tiny_model("llama"), str(folder))
    message = str(err.value)
    assert "not a PEFT one" in message and "loramix.load_adapter" in message
    assert ("--format mixtral" if kind == "mixlora" else "--format peft --task") in message
    assert "loramix export" in message
    loaded = loramix.load_adapter(tiny_model("llama"), folder)  # loramix reads it back
    assert loaded.loramix_adapter.config == config


def _write_format_1(model, folder):
    """What loramix 0.1 (format_version 1) wrote: loramix's settings and state-dict keys, no PEFT schema."""
    state = model.loramix_adapter
    folder.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in loramix.adapter_parameters(model).items()}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = {"format": "loramix-adapter", "format_version": 1, "loramix_version": "0.1.0", "kind": state.config.kind,
            "config": state.config.to_dict(), "base_model": None, "model_family": state.family.name,
            "hidden_size": model.config.hidden_size, "num_layers": model.config.num_hidden_layers, "extra": {}}
    (folder / "adapter_config.json").write_text(json.dumps(meta, indent=2))


@pytest.mark.parametrize("kind", ["lora", "mixdora"])
def test_format_1_folders_still_load(tmp_path, kind):
    ids, mask, _ = batch()
    config = loramix.LoraConfig(r=4, alpha=8, targets=None, use_dora=True) if kind == "lora" \
        else mixlora_config(use_dora=True)
    model = loramix.inject(tiny_model("llama"), config)
    perturb_adapter(model, seed=5, b_std=0.3, router_std=0.5)
    model.eval()
    _write_format_1(model, tmp_path / "old")
    loaded = loramix.load_adapter(tiny_model("llama"), tmp_path / "old").eval()
    assert loaded.loramix_adapter.config == config
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(model, ids, mask), atol=0, rtol=0)
    # Saving it again writes this version's format, which reads back the same.
    again = loramix.load_adapter(tiny_model("llama"), loramix.save_adapter(loaded, tmp_path / "new")).eval()
    torch.testing.assert_close(logits_of(again, ids, mask), logits_of(model, ids, mask), atol=0, rtol=0)


def test_every_peft_writer_records_the_embedded_base_as_transformers_loads_it(tmp_path, monkeypatch):
    # PEFT's base_model_name_or_path is read by transformers, which cannot load the alias "smollm2-135m":
    # save_adapter, the peft export of an in-memory model and one MoRE task all record its converted folder.
    from loramix import hub
    from loramix.adapters.export import export_adapter
    from loramix.adapters.more_tasks import export_task_peft

    converted = tmp_path / "smollm2-converted"
    monkeypatch.setattr(hub, "embedded_folder", lambda convert=False: converted)
    lora = loramix.inject(tiny_model("llama"), loramix.LoraConfig(r=4, alpha=8, targets=["q_proj"]))
    more = loramix.inject(tiny_model("llama"), loramix.MoreConfig(max_rank=4, tasks=["a", "b"]))
    for model in (lora, more):
        model.config._name_or_path = "smollm2-135m"
    folders = [loramix.save_adapter(lora, tmp_path / "saved"), export_adapter(lora, tmp_path / "peft", format="peft"),
               export_task_peft(more, "b", tmp_path / "task")]
    for folder in folders:
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(converted)
    assert loramix.adapters.read_adapter_config(folders[0])["base_model"] == "smollm2-135m"  # loramix keeps the alias
