"""The lm-evaluation-harness setup shared by ``test_lm_eval.py`` and ``test_serve_logprobs.py`` (registered from
``conftest.py`` with ``pytest_plugins``): a local multiple-choice task, a tiny base with a LoRA and a MixLoRA
adapter saved, and the per-choice scores of ``loramix.evaluate`` every route is compared with."""

from __future__ import annotations

import json

import pytest

import loramix
from conftest import mixlora_config, perturb_adapter
from loramix.data.examples import MultipleChoiceExample
from loramix.evaluate import evaluate_multiple_choice
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

TASK = "loramix_tiny_mc"
ROWS = [
    {"question": "Which is a fruit?", "choices": ["apple", "the cat", "a dog"], "answer": 0},
    {"question": "the cat sat on the", "choices": ["mat", "park", "red green"], "answer": 0},
    {"question": "Which is a colour?", "choices": ["blue", "no", "the park", "true"], "answer": 0},
    {"question": "a dog ran in the", "choices": ["park", "mat"], "answer": 0},
]


def base_model():
    return tiny_model("llama", vocab_size=len(tiny_tokenizer()))


def adapted(config, seed=7):
    model = loramix.inject(base_model(), config)
    perturb_adapter(model, seed=seed, b_std=0.3, router_std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base model folder (weights + tokenizer), a task folder, a LoRA folder and a MixLoRA folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    base_model().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    (root / "tasks").mkdir()
    (root / "tasks" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "tasks" / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'tasks' / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\\nAnswer:\"\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    lora = adapted(loramix.LoraConfig(r=4, alpha=8, targets=None, use_dora=True, use_rslora=True))
    mix = adapted(mixlora_config(routing="top_p", top_p=0.7))  # no Mixtral export exists for top_p routing
    for model, name in ((lora, "lora"), (mix, "mixlora")):
        model.config._name_or_path = str(root / "base")
        loramix.save_adapter(model, root / name)
    return root, {"lora": lora, "mixlora": mix}


def loramix_scores(model) -> list[list[float]]:
    """Per-choice log-likelihood sums from loramix's own evaluation (the reference)."""
    examples = [MultipleChoiceExample(question=r["question"], choices=r["choices"], gold=r["answer"], task="t",
                                      id=str(i)) for i, r in enumerate(ROWS)]
    out = evaluate_multiple_choice(model, tiny_tokenizer(), examples, protocol="loglik", template=None,
                                   normalize="none", progress=False, batch_size=4)
    return out["scores"]


def samples_scores(samples: list[dict]) -> list[list[float]]:
    """Per-choice log-likelihoods from lm-eval's logged samples, in document order."""
    by_doc = sorted(samples, key=lambda s: s["doc_id"])
    return [[float(resp[0]) for resp in s["filtered_resps"]] for s in by_doc]
