"""An adapter's memory, known before it is built (``loramix.models.footprint``), and the refusal of one that
cannot fit (issue 21, case 8: ``adapter.r=100000`` was an allocator error after 40 s)."""

from __future__ import annotations

import math

import pytest
import torch

import loramix
from cli_setup import question_rows, tiny_model_folder, write_config, write_jsonl
from conftest import mixlora_config
from loramix.cli import main
from loramix.config import ConfigError
from loramix.models.footprint import TRAINING_COPIES, adapter_footprint, available_memory, check_adapter_fits
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

CONFIGS = {
    "lora": lambda: loramix.LoraConfig(r=3, targets=None),
    "dora-bf16": lambda: loramix.LoraConfig(r=2, targets=["q_proj", "down_proj"], use_dora=True,
                                            adapter_dtype="bfloat16"),
    "mixlora": lambda: mixlora_config(r=2, num_experts=3, attention_r=5),
    "mixdora": lambda: mixlora_config(r=2, num_experts=3, use_dora=True, ffn_targets=["up_proj"]),
    "more": lambda: loramix.MoreConfig(max_rank=4, ranks=[2, 4], tasks=["a", "b", "c"]),
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_footprint_is_what_inject_allocates(kind, family):
    """Computed from the shapes before inject: the element count of the adapter inject then builds, and
    4 × its bytes (parameter, gradient, AdamW's two moments) on its device (GPT-2: Conv1D stored (in, out);
    Phi: plain FFN; half-precision adapter_dtype)."""
    if family != "llama" and kind == "dora-bf16":
        pytest.skip("targets named for Llama")
    model = tiny_model(family)
    config = CONFIGS[kind]()
    if family != "llama" and isinstance(config, loramix.MixLoraConfig):
        config.ffn_targets = None  # every FFN projection of the family
    need = adapter_footprint(model, config)
    loramix.inject(model, config)
    params = loramix.adapter_parameters(model).values()
    assert need.parameters == sum(p.numel() for p in params) > 0
    assert need.training_bytes == {torch.device("cpu"): TRAINING_COPIES * sum(p.numel() * p.element_size()
                                                                               for p in params)}


def test_inject_refuses_an_adapter_that_cannot_fit_before_allocating():
    """LoRA of a rank that needs twice the memory there is: a ConfigError giving the size and naming
    adapter.r, raised before the model is touched (no adapter, same modules and hooks)."""
    model = tiny_model("llama")
    free = available_memory(torch.device("cpu"))
    assert free is not None and free > 0
    per_rank = adapter_footprint(model, loramix.LoraConfig(r=1)).training_bytes[torch.device("cpu")]
    rank = math.ceil(2 * free / per_rank)
    modules, hooks = list(model.named_modules()), (dict(model._forward_pre_hooks), dict(model._forward_hooks))
    with pytest.raises(ConfigError) as err:
        loramix.inject(model, loramix.LoraConfig(r=rank))
    message = str(err.value)
    assert f"adapter.r (now {rank})" in message and "GiB" in message and "available" in message
    assert getattr(model, "loramix_adapter", None) is None and list(model.named_modules()) == modules
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks
    assert all(p.requires_grad for p in model.parameters())  # inject had not begun freezing the base
    assert check_adapter_fits(model, loramix.LoraConfig(r=2)).parameters > 0  # a small one passes


def test_mixlora_with_a_million_experts_names_num_experts():
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"adapter\.num_experts \(now 1000000000\)"):
        loramix.inject(model, mixlora_config(num_experts=10**9))
    assert getattr(model, "loramix_adapter", None) is None


@pytest.mark.parametrize("override", [["adapter.r=1000000000000"],
                                      ["adapter.kind=mixlora", "adapter.num_experts=1000000000000"]])
def test_train_cli_refuses_an_adapter_that_cannot_fit(override, tmp_path, capsys):
    """loramix train: exit code 2, one line naming the setting and the size, no traceback."""
    model = tiny_model_folder(tmp_path / "model")
    data = write_jsonl(tmp_path / "qa.jsonl", question_rows(6))
    config = write_config(tmp_path / "cfg.yaml", model, str(data), str(tmp_path / "run"))
    assert main(["train", str(config), *override]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if line.startswith("loramix train: error:"))
    setting = override[-1].split("=")[0]
    assert f"{setting} (now 1000000000000)" in line and "GiB" in line and "available" in line
