"""Scoring (``evaluate_multiple_choice``) and generation (``generate_text``) skip what only training reads.

Their frozen forwards run with ``context.inference_only`` set (``models.inject.inference_only_calls``): no
auxiliary loss is recorded and no router statistic written, the outputs are the same bit for bit as with the flag
off, the flag's previous value comes back after (also when the forward raises), and a training forward right after
records its losses again. One tiny Llama per adapter kind; the reference is the same call with the flag held off
(``AlwaysRecording``), which is what every such call did before.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch
from torch import nn

import loramix
from conftest import perturb_adapter
from loramix.adapters.more_tasks import use_task
from loramix.data import MultipleChoiceExample
from loramix.evaluate import evaluate_many, evaluate_multiple_choice
from loramix.models.inject import adapter_state, inference_only_calls
from loramix.models.many import AdapterView, inject_many
from loramix.modules import ForwardContext, adapter_modules
from loramix.modules.auxiliary import AuxiliaryLosses
from loramix.modules.more import MoreLinear
from loramix.serve import generate_text
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: thread hand-offs cost more than they give

TASK_IDS = {"t1": 0, "t2": 1}
CONFIGS = {
    "lora": ("lora", {"r": 4, "alpha": 8, "dropout": 0.0, "targets": None}),
    "mixlora": ("mixlora", {"r": 4, "alpha": 8, "dropout": 0.0, "num_experts": 4, "top_k": 2,
                            "attention_targets": None, "ffn_targets": None}),
    "more": ("more", {"max_rank": 4, "alpha": 8, "dropout": 0.0, "targets": None, "tasks": list(TASK_IDS)}),
    "mola": ("mola", {"r": 2, "alpha": 4, "num_experts": [2, 3], "top_k": 2, "aux_loss_coef": 0.01,
                      "dropout": 0.0}),
    "loramoe": ("loramoe", {"r": 2, "alpha": 4, "num_experts": 4, "tasks": list(TASK_IDS), "dropout": 0.0}),
    "hydralora": ("hydralora", {"r": 2, "alpha": 4, "num_heads": 3, "dropout": 0.0}),
}
KINDS = list(CONFIGS)
TASKED = {"more", "loramoe"}  # the kinds whose calls take task ids
# the losses a training forward of each kind records (names in the collector's means)
TRAINING_LOSSES = {"lora": set(), "mixlora": {"aux_loss", "z_loss"}, "more": {"contrastive_loss"},
                   "mola": {"aux_loss"}, "loramoe": {"balance_loss"}, "hydralora": set()}
ROUTED = {"mixlora", "mola", "loramoe", "hydralora"}  # the kinds that keep router statistics (``last_load``)

EXAMPLES = [  # different lengths and numbers of choices, so batches get padded
    MultipleChoiceExample("Which is a fruit?", ["apple", "stone", "cloud", "the cat"], 0, "t1", "a"),
    MultipleChoiceExample("Is the cat on the mat? yes or no", ["yes", "no"], 1, "t1", "b"),
    MultipleChoiceExample("a dog ran in the park. what ran?", ["red", "green", "a dog"], 2, "t2", "c"),
    MultipleChoiceExample("Colour?", ["blue", "true", "false", "green", "mat"], 3, "t2", "d"),
]
# (protocol, share_prompt): the three prediction functions of ``_scores``
SCORINGS = [("label", True), ("loglik", True), ("loglik", False)]


class AlwaysRecording(ForwardContext):
    """A context whose ``inference_only`` reads False whatever is written to it: every call records its losses
    and statistics, as every scoring and generation call did before ``inference_only_calls``."""

    inference_only = property(lambda self: False, lambda self, value: None)


@contextlib.contextmanager
def always_recording(model: nn.Module) -> Iterator[None]:
    """Within the block the model's adapter records in every forward (its context is an ``AlwaysRecording``)."""
    context = adapter_state(model).context
    context.__class__ = AlwaysRecording
    try:
        yield
    finally:
        context.__class__ = ForwardContext


class Recorded:
    """Counts ``AuxiliaryLosses.record`` calls (every kind's losses go through it) and MoRE's contrastive loss."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.records = self.contrastive = 0
        record, contrastive = AuxiliaryLosses.record, MoreLinear._contrastive_loss

        def counted_record(collector, *args, **kwargs):
            self.records += 1
            return record(collector, *args, **kwargs)

        def counted_contrastive(module, *args, **kwargs):
            self.contrastive += 1
            return contrastive(module, *args, **kwargs)

        monkeypatch.setattr(AuxiliaryLosses, "record", counted_record)
        monkeypatch.setattr(MoreLinear, "_contrastive_loss", counted_contrastive)

    def reset(self) -> None:
        self.records = self.contrastive = 0


def adapted(kind: str) -> nn.Module:
    """The tiny Llama (the tiny tokenizer's vocabulary) with a perturbed ``kind`` adapter, in eval mode."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    model = loramix.inject(model, loramix.config.adapter_config_from_dict(*CONFIGS[kind]))
    perturb_adapter(model, seed=3, b_std=0.1, router_std=0.5)
    return model.eval()


def clear_statistics(model: nn.Module) -> None:
    for _, module in adapter_modules(model):
        module.last_load = module.last_prob = None


def statistics_written(model: nn.Module) -> bool:
    return any(module.last_load is not None for _, module in adapter_modules(model))


def score(model: nn.Module, kind: str, protocol: str, share_prompt: bool) -> dict[str, Any]:
    return evaluate_multiple_choice(model, tiny_tokenizer(), EXAMPLES, protocol=protocol, batch_size=3,
                                    template=None, progress=False, share_prompt=share_prompt,
                                    task_ids=TASK_IDS if kind in TASKED else None)


@pytest.mark.parametrize("kind", KINDS)
def test_scoring_records_nothing_and_gives_the_recording_scores(kind, monkeypatch):
    """(a) the same scores, float for float, as with the flag held off; (b) no loss recorded (no ``record`` call,
    no contrastive loss computed) and no router statistic written, where the flag held off records them."""
    model = adapted(kind)
    recorded = Recorded(monkeypatch)
    for protocol, share_prompt in SCORINGS:
        clear_statistics(model)
        recorded.reset()
        with always_recording(model):
            want = score(model, kind, protocol, share_prompt)
        if TRAINING_LOSSES[kind]:  # the reference did record: the check below can tell the two apart
            assert recorded.records > 0, (kind, protocol)
        assert recorded.contrastive > 0 if kind == "more" else recorded.contrastive == 0
        assert statistics_written(model) == (kind in ROUTED), (kind, protocol)

        clear_statistics(model)
        recorded.reset()
        got = score(model, kind, protocol, share_prompt)
        assert (recorded.records, recorded.contrastive) == (0, 0), (kind, protocol, share_prompt)
        assert not statistics_written(model), (kind, protocol, share_prompt)
        assert got["scores"] == want["scores"], (kind, protocol, share_prompt)
        assert got["predictions"] == want["predictions"]


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_logits_are_bit_identical_with_the_flag_on(kind):
    """(a) one frozen forward of padded rows: ``torch.equal`` logits with ``inference_only`` on and off."""
    model = adapted(kind)
    tok = tiny_tokenizer()
    ids = torch.randint(3, len(tok), (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding on the first row
    extra = {"task_ids": torch.tensor([0, 1, 0])} if kind in TASKED else {}
    with torch.no_grad():
        with always_recording(model):
            want = model(input_ids=ids, attention_mask=mask, **extra).logits
        with inference_only_calls(model):
            got = model(input_ids=ids, attention_mask=mask, **extra).logits
    assert torch.equal(got, want), kind


@pytest.mark.parametrize("kind", KINDS)
def test_generation_records_nothing_and_gives_the_recording_tokens(kind, monkeypatch):
    """``generate_text`` (``loramix generate``): the same tokens as with the flag held off, nothing recorded, the
    flag back to off after."""
    model = adapted(kind)
    tok = tiny_tokenizer()
    outputs: list[torch.Tensor] = []
    real_generate = model.generate

    def kept_generate(**kwargs):
        outputs.append(real_generate(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(model, "generate", kept_generate)
    recorded = Recorded(monkeypatch)
    task = use_task(model, "t1") if kind == "more" else contextlib.nullcontext()  # generate passes no task ids
    with task:
        with always_recording(model):
            want = generate_text(model, tok, "the cat sat", raw=True, max_new_tokens=5)
        if TRAINING_LOSSES[kind]:
            assert recorded.records > 0, kind
        clear_statistics(model)
        recorded.reset()
        got = generate_text(model, tok, "the cat sat", raw=True, max_new_tokens=5)
    assert (recorded.records, recorded.contrastive) == (0, 0), kind
    assert not statistics_written(model), kind
    assert got == want and torch.equal(outputs[1], outputs[0]), kind
    assert adapter_state(model).context.inference_only is False


def flag_seen_inside(model: nn.Module, fail: bool) -> list[bool]:
    """A hook on the last decoder layer that notes the flag in every forward (and raises, with ``fail``)."""
    seen: list[bool] = []
    context = adapter_state(model).context

    def hook(*_: Any) -> None:
        seen.append(context.inference_only)
        if fail:
            raise RuntimeError("injected failure")

    model.model.layers[-1].register_forward_hook(hook)
    return seen


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("before", [False, True])
def test_the_flag_is_on_during_scoring_and_back_after_also_when_the_forward_raises(kind, before):
    """(c) the flag is on in every scoring forward and has its previous value after, also after an exception."""
    for fail in (False, True):
        model = adapted(kind)
        context = adapter_state(model).context
        context.inference_only = before
        seen = flag_seen_inside(model, fail)
        with pytest.raises(RuntimeError, match="injected failure") if fail else contextlib.nullcontext():
            score(model, kind, "loglik", True)
        assert seen and all(seen), (kind, fail)
        assert context.inference_only is before, (kind, fail)
        assert not model.training  # ``adapted`` gave it in eval mode: restored to that


@pytest.mark.parametrize("kind", KINDS)
def test_training_right_after_scoring_records_its_losses(kind, monkeypatch):
    """(d) the flag does not leak: a training forward after scoring records the kind's losses, writes its router
    statistics, and adds the weighted losses to ``out.loss``, as one before any scoring does."""
    model = adapted(kind)
    tok = tiny_tokenizer()
    ids = torch.randint(3, len(tok), (2, 8), generator=torch.Generator().manual_seed(1))
    extra = {"task_ids": torch.tensor([0, 1])} if kind in TASKED else {}

    def train_forward() -> dict[str, float]:
        model.train()
        clear_statistics(model)
        out = model(input_ids=ids, labels=ids, **extra)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        assert statistics_written(model) == (kind in ROUTED), kind
        return {name: float(value.detach()) for name, value in adapter_state(model).context.losses.collect().items()}

    first = train_forward()
    assert set(first) == TRAINING_LOSSES[kind], kind
    score(model, kind, "loglik", True)
    assert adapter_state(model).context.inference_only is False
    assert train_forward() == first, kind  # same batch, no step taken: the same losses


def test_a_stacked_model_is_left_as_it_is():
    """Several adapters (``inject_many``), scored together or through one adapter's view: the flag also picks the
    grouped forms there, whose outputs equal the per-adapter path's only up to summation order; scoring leaves it
    off, so their scores do not move."""
    model = inject_many(tiny_model("llama", vocab_size=len(tiny_tokenizer())),
                        {name: loramix.config.adapter_config_from_dict(*CONFIGS[name]) for name in ("lora", "mixlora")})
    perturb_adapter(model, seed=3, b_std=0.1, router_std=0.5)
    contexts = [state.context for state in model.loramix_many.adapters.values()]
    seen: list[bool] = []
    model.model.layers[-1].register_forward_hook(lambda *_: seen.extend(c.inference_only for c in contexts))
    evaluate_many(model, tiny_tokenizer(), {"lora": EXAMPLES, "mixlora": EXAMPLES}, protocol="loglik",
                  batch_size=3, template=None, progress=False)
    assert seen and not any(seen)
    seen.clear()
    # one adapter's view (the Trainer's job model) has that adapter's state as its ``loramix_adapter``
    evaluate_multiple_choice(AdapterView(model, "mixlora"), tiny_tokenizer(), EXAMPLES, protocol="loglik",
                             batch_size=3, template=None, progress=False)
    assert seen and not any(seen)
    assert all(c.inference_only is False for c in contexts)
