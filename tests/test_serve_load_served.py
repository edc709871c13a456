"""``load_served`` reads and checks every adapter folder before it attaches the first (``load_many``)."""

from __future__ import annotations

import pytest
import torch

import loramix
from conftest import model_fingerprint, saved_adapter
from loramix.serve.server.engine import BASE, load_served
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

LORA = loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None)


def test_a_bad_folder_leaves_the_model_as_it_was(tmp_path) -> None:
    """Before, the folders were loaded one at a time: the good first adapter was injected (the base frozen) when
    the second folder's weights failed."""
    _, good = saved_adapter(tmp_path / "good", LORA)
    _, damaged = saved_adapter(tmp_path / "damaged", LORA)
    weights = damaged / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    base = tiny_model("llama")
    before = model_fingerprint(base), [(n, p.requires_grad) for n, p in base.named_parameters()]
    with pytest.raises(loramix.AdapterLoadError, match=str(damaged)):
        load_served(base, tiny_tokenizer(), {"good": good, "bad": damaged}, base_name="base")
    assert (model_fingerprint(base), [(n, p.requires_grad) for n, p in base.named_parameters()]) == before
    assert all(p.requires_grad for p in base.parameters())


def test_served_adapters_equal_their_folders(tmp_path) -> None:
    model, good = saved_adapter(tmp_path / "good", LORA)
    served = load_served(tiny_model("llama"), tiny_tokenizer(), {"good": good}, base_name="base")
    assert list(served.order) == [BASE, "good"] and set(served.model.loramix_many.adapters) == {BASE, "good"}
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = served.model(input_ids=ids, adapter_rows=[("good", 2)]).logits
        torch.testing.assert_close(got, model.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)
        bare = served.model(input_ids=ids, adapter_rows=[(BASE, 2)]).logits
        torch.testing.assert_close(bare, tiny_model("llama")(input_ids=ids).logits, rtol=0, atol=1e-5)
