"""The training loss from the output layer's rows at labelled positions only (``logits_at``): the same summed
cross-entropy, token counts and adapter gradients as from the whole (B, T, V) logits, per run of rows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loramix import MixLoraConfig, inject
from loramix.models.inject import adapter_parameters
from loramix.models.losses import IGNORE_INDEX, label_losses, logits_at, loss_positions
from conftest import perturb_adapter
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_losses(logits: torch.Tensor, labels: torch.Tensor, rows: list[int]) -> list[tuple[torch.Tensor, int]]:
    """Per run: Σ over its rows and positions t with a label at t + 1 of -log softmax(logits[t])[label], by loops."""
    out, start = [], 0
    for count in rows:
        total, n = logits.new_zeros((), dtype=torch.float64), 0
        for b in range(start, start + count):
            for t in range(labels.shape[1] - 1):
                if labels[b, t + 1] != IGNORE_INDEX:
                    total = total - torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]]
                    n += 1
        out.append((total, n))
        start += count
    return out


def batch_with_answers(vocab: int) -> dict[str, torch.Tensor]:
    """Five right-padded rows with prompts of -100 labels and answers of different lengths; row 3 has none."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (length, answer) in enumerate([(9, 3), (6, 2), (8, 5), (7, 0), (4, 1)]):
        mask[row, length:] = 0
        labels[row, length - answer:length] = ids[row, length - answer:length]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_positions_are_those_before_each_label():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX]])
    assert loss_positions(labels).tolist() == [[False, True, True, False], [True, False, False, False]]


@pytest.mark.parametrize("rows", [[5], [2, 3], [3, 1, 1]])  # one job, or several jobs' runs in one batch
def test_picked_logits_give_the_losses_and_gradients_of_all_logits(rows):
    model = inject(tiny_model("llama"), MixLoraConfig(r=4, alpha=8, num_experts=4, top_k=2, dropout=0.0))
    perturb_adapter(model, seed=1, every_std=0.2)
    batch = batch_with_answers(model.config.vocab_size)
    params = list(adapter_parameters(model).values())
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}

    full = model(**model_inputs).logits  # (B, T, V)
    assert full.shape[:2] == batch["labels"].shape
    want = reference_losses(full.detach(), batch["labels"], rows)
    full_losses = label_losses(full, batch["labels"], rows)
    full_grads = torch.autograd.grad(sum(ce for ce, _ in full_losses), params)

    positions = loss_positions(batch["labels"])
    with logits_at(model, positions) as taken:
        picked = model(**model_inputs).logits
    assert taken and picked.shape == (1, int(positions.sum()), full.shape[-1])
    got = label_losses(picked, batch["labels"], rows, positions)
    grads = torch.autograd.grad(sum(ce for ce, _ in got), params)

    assert [n for _, n in got] == [n for _, n in want] == [n for _, n in full_losses]
    for (ce, _), (ref, _), (whole, _) in zip(got, want, full_losses):
        assert float(ce.detach()) == pytest.approx(float(ref), rel=1e-5, abs=1e-5)
        assert float(ce.detach()) == pytest.approx(float(whole.detach()), rel=1e-5, abs=1e-5)
    for g, h in zip(grads, full_grads):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().sum()) > 0 for g in grads)  # the gradient reaches the adapter


class NoHeadCall(nn.Module):
    """A causal LM whose output layer is a weight it multiplies by itself: ``logits_at`` cannot pick positions."""

    def __init__(self, vocab: int = 11, dim: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids) @ self.head.weight.t()


def test_a_model_that_bypasses_its_head_keeps_all_logits():
    model = NoHeadCall()
    labels = torch.tensor([[IGNORE_INDEX, 3, 4]])
    with logits_at(model, loss_positions(labels)) as taken:
        logits = model(torch.tensor([[1, 2, 3]]))
    assert not taken and logits.shape == (1, 3, 11)
    (ce, n), = label_losses(logits, labels, [1])
    want = float(reference_losses(logits.detach(), labels, [1])[0][0])
    assert n == 2 and float(ce.detach()) == pytest.approx(want, rel=1e-6)
    assert not model.head._forward_pre_hooks  # the hook is gone after the block
