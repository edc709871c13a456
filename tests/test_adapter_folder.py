"""The one adapter-folder reader: each check fails with a message naming the file/key (never silently),
and load, load_many and export give the same answer for the same folder."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
import transformers

import loramix
from loramix.adapters.export import AdapterWeights, export_adapter
from loramix.adapters.io import load_many
from conftest import mixlora_config, saved_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def named(model, name):
    model.config._name_or_path = name
    return model


def saved(tmp_path, config, name="adapter", base="org/base-a", family="llama"):
    return saved_adapter(tmp_path / name, config, family=family, base=base, seed=4, b_std=0.2)


def lora_config(**kw):
    return loramix.LoraConfig(**{**dict(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]), **kw})


def edit_json(path, change):
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


def files_of(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_config_rank_over_other_tensors_is_the_same_error_for_load_and_export(tmp_path):
    """Issue 13 item 2: 'r: 8' over rank-16 tensors made export write lora_B 2x wrong (exit 0)."""
    _, folder = saved(tmp_path, lora_config(r=4, alpha=8))

    edit_json(folder / "adapter_config.json", lambda m: m.update(r=2))  # PEFT's settings
    edit_json(folder / "loramix_config.json", lambda m: m["config"].update(r=2))  # loramix's
    errors = []
    with pytest.raises(loramix.AdapterLoadError) as err:
        loramix.load_adapter(tiny_model("llama"), folder)
    errors.append(str(err.value))
    with pytest.raises(loramix.AdapterLoadError) as err:
        export_adapter(folder, tmp_path / "out", format="peft")
    errors.append(str(err.value))
    assert files_of(tmp_path / "out") == []  # nothing written
    assert errors[0] == errors[1]
    assert re.search(r"adapter_model\.safetensors: 'model\.layers\.0\.\S+\.lora_A' has shape \(4, \d+\), "
                     r"but adapter_config\.json says r = 2", errors[0])


def test_mixlora_expert_rank_and_experts_checked_without_a_model(tmp_path):
    _, folder = saved(tmp_path, mixlora_config())
    edit_json(folder / "adapter_config.json", lambda m: m["config"].update(num_experts=3, top_k=2))
    with pytest.raises(loramix.AdapterLoadError, match=r"experts\.lora_A\.\w+' has shape \(4, 4, \d+\), but adapter_config\.json says num_experts = 3"):
        AdapterWeights.from_folder(folder)  # what every export reads


def test_lora_settings_files_that_disagree_are_refused(tmp_path):
    _, folder = saved(tmp_path, lora_config(use_dora=True))
    edit_json(folder / "adapter_config.json", lambda m: m.update(use_dora=False))
    with pytest.raises(loramix.AdapterLoadError, match=r"'use_dora' is False but loramix_config\.json says use_dora = True"):
        loramix.load_adapter(tiny_model("llama"), folder)


def test_weights_of_another_kind_are_named(tmp_path):
    _, mix = saved(tmp_path, mixlora_config(), name="mix")
    _, lora = saved(tmp_path, lora_config(), name="lora")
    (mix / "adapter_model.safetensors").replace(tmp_path / "w")
    (tmp_path / "w").replace(lora / "adapter_model.safetensors")
    edit_json(lora / "adapter_config.json", lambda m: None)
    with pytest.raises(loramix.AdapterLoadError, match=r"is not a LoRA tensor loramix can load"):
        loramix.load_adapter(tiny_model("llama"), lora)  # PEFT layout: loramix keys are not PEFT keys
    _, mix = saved(tmp_path, mixlora_config(), name="mix2")
    edit_json(mix / "adapter_config.json", lambda m: m.update(kind="lora", config={"r": 4, "alpha": 8}))
    with pytest.raises(loramix.AdapterLoadError, match=r"mlp\.\S+' is a tensor of a 'mixlora' adapter.*says the adapter is 'lora'"):
        loramix.load_adapter(tiny_model("llama"), mix)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights_name_the_path_in_export_too(tmp_path, damage):
    _, folder = saved(tmp_path, lora_config())
    path = folder / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\x00" * 64)
    for read in (lambda: AdapterWeights.from_folder(folder), lambda: loramix.load_adapter(tiny_model("llama"), folder)):
        with pytest.raises(loramix.AdapterLoadError, match=rf"{path}: not a readable safetensors file.*save the adapter again"):
            read()


def test_non_utf8_or_broken_json_names_the_file(tmp_path):
    _, folder = saved(tmp_path, mixlora_config())
    config = folder / "adapter_config.json"
    config.write_bytes(b'{"format": "loramix-adapter", "kind": "mixlora\xff\xfe"}')
    with pytest.raises(loramix.AdapterLoadError, match=rf"{config}: not UTF-8 text"):
        loramix.load_adapter(tiny_model("llama"), folder)
    config.write_text("[1, 2]")
    with pytest.raises(loramix.AdapterLoadError, match=rf"{config}: expected a JSON object"):
        AdapterWeights.from_folder(folder)
    _, lora = saved(tmp_path, lora_config(), name="lora")
    (lora / "loramix_config.json").write_text("{oops")
    with pytest.raises(loramix.AdapterLoadError, match=r"loramix_config\.json: not valid JSON \(line 1, column 2"):
        loramix.load_adapter(tiny_model("llama"), lora)


def test_a_run_folder_points_to_its_adapter(tmp_path):
    run = tmp_path / "run"
    saved(run, lora_config(), name="adapter")
    with pytest.raises(loramix.AdapterLoadError, match=rf"{run}: not an adapter folder.*its adapter is {run / 'adapter'}"):
        loramix.load_adapter(tiny_model("llama"), run)
    (run / "adapter").rename(tmp_path / "moved")
    for step in (2, 10):
        saved(run / "checkpoints" / f"step-{step}", lora_config(), name="adapter")
    newest = run / "checkpoints" / "step-10" / "adapter"
    with pytest.raises(loramix.AdapterLoadError, match=rf"did not finish.*newest checkpoint's adapter is {newest}"):
        export_adapter(run, tmp_path / "out", format="peft")
    with pytest.raises(loramix.AdapterLoadError, match=rf"its adapter is {newest}"):
        loramix.load_adapter(tiny_model("llama"), newest.parent)  # a checkpoint folder
    assert loramix.load_adapter(tiny_model("llama"), newest)
    trainer_run = tmp_path / "hf-run"  # a transformers Trainer's output_dir: checkpoint-N are adapter folders
    for step in (5, 20):
        saved(trainer_run, lora_config(), name=f"checkpoint-{step}")
    with pytest.raises(loramix.AdapterLoadError, match=rf"newest checkpoint's adapter is {trainer_run / 'checkpoint-20'}"):
        loramix.load_adapter(tiny_model("llama"), trainer_run)


def test_a_different_base_of_the_same_shape_warns_with_both_names(tmp_path):
    ids, mask, _ = batch()
    model, folder = saved(tmp_path, mixlora_config(), base="org/base-a")
    with pytest.warns(UserWarning, match=r"trained on base model 'org/base-a' is being loaded onto 'org/base-b'"):
        other = loramix.load_adapter(named(tiny_model("llama"), "org/base-b"), folder)
    torch.testing.assert_close(other(input_ids=ids, attention_mask=mask).logits,
                               model(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    with pytest.warns(UserWarning, match="org/base-a.*org/base-b"):
        load_many(named(tiny_model("llama"), "org/base-b"), {"a": folder})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recorded base, or an unnamed model: no warning
        loramix.load_adapter(named(tiny_model("llama"), "org/base-a"), folder)
        loramix.load_adapter(named(tiny_model("llama"), ""), folder)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    _, by_path = saved(tmp_path, lora_config(), name="by-path", base=str(base_dir))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same folder written another way is the same base
        loramix.load_adapter(named(tiny_model("llama"), str(base_dir) + "/./"), by_path)


@pytest.mark.parametrize("change", ["layers", "hidden"])
def test_a_base_of_another_shape_fails_once_naming_both_bases(tmp_path, change):
    config = lora_config() if change == "hidden" else mixlora_config()
    _, folder = saved(tmp_path, config, base="org/base-a")
    other_shape = dict(num_hidden_layers=3) if change == "layers" else dict(hidden_size=64, head_dim=8)
    other = named(tiny_model("llama", **other_shape), "org/base-c")
    with pytest.raises(loramix.AdapterLoadError) as err:
        loramix.load_adapter(other, folder)
    message = str(err.value)
    assert "trained on base model 'org/base-a'" in message and "('org/base-c'" in message
    assert "Load the adapter onto 'org/base-a'" in message and "missing" not in message
    assert ("3 layers" if change == "layers" else "hidden size 64") in message
    assert not hasattr(other, "loramix_adapter")


def test_missing_key_of_a_peft_layout_folder_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved(tmp_path, lora_config())
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[gone]
    save_file(tensors, str(path))
    for read in (lambda: loramix.load_adapter(tiny_model("llama"), folder), lambda: AdapterWeights.from_folder(folder)):
        with pytest.raises(loramix.AdapterLoadError, match=r"adapter_model\.safetensors: the tensors are not those its "
                           r"settings.*missing 1 key\(s\).*model\.layers\.1\.self_attn\.v_proj\.lora_B"):
            read()


def test_a_module_missing_from_the_file_is_not_exported_unmerged(tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved(tmp_path, lora_config())
    path = folder / "adapter_model.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if ".layers.0.mlp.down_proj." not in k}
    save_file(tensors, str(path))
    with pytest.raises(loramix.AdapterLoadError, match=r"missing 2 key\(s\).*model\.layers\.0\.mlp\.down_proj\.lora_A"):
        export_adapter(folder, tmp_path / "merged", format="merged", base=None)
    assert files_of(tmp_path / "merged") == []


@pytest.mark.parametrize("adapter", [{"kind": "mixlora", "r": 2, "alpha": 4, "num_experts": 2, "top_k": 1},
                                     {"kind": "more", "max_rank": 2, "alpha": 4, "tasks": ["arc-e"]}])
def test_a_trained_folder_records_a_base_transformers_can_load(tmp_path, monkeypatch, capsys, adapter,
                                                               embedded_stand_in):
    """Issue 21 case 12: a MixLoRA folder written by `loramix train` on smollm2-135m recorded the alias as
    base_model_name_or_path (LoRA folders: the converted folder), so from_pretrained(folder) went to the Hub
    (OSError) instead of stopping with the KeyError that says to use loramix.load_adapter."""
    from loramix.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    config = {"model": "smollm2-135m", "adapter": adapter, "output_dir": "run", "batch_size": 2, "max_steps": 1,
              "data": {"train": ["arc-e"], "train_limit": 4, "eval": []}, "progress": False, "plots": False}
    (tmp_path / "train.yaml").write_text(json.dumps(config))
    assert main(["train", "train.yaml"]) == 0, capsys.readouterr().err
    folder = tmp_path / "run" / "adapter"
    recorded = json.loads((folder / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(embedded_stand_in)
    assert loramix.adapters.read_adapter_config(folder)["base_model"] == "smollm2-135m"  # loramix keeps its name
    with pytest.raises(KeyError, match=rf"a loramix {'MixLoRA' if adapter['kind'] == 'mixlora' else 'MoRE'} "
                                       r"adapter, not a PEFT one: load it with loramix.load_adapter"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
