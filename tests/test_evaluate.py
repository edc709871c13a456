"""Evaluation: fake models with controlled logits (accuracy 1.0 / 0.0), batched vs reference scores,
the eval command end to end on a tiny local model, and one smoke test on the real SmolLM2."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch import nn

from loramix.data import MultipleChoiceExample, encode_continuation, encode_prompt, load_examples, render_prompt, render_targets
from loramix.evaluate import evaluate_multiple_choice, label_token_ids
from conftest import perturb_adapter
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer

# tiny models: with a second thread the time goes to thread hand-offs (10x slower on a busy CPU)
pytestmark = pytest.mark.usefixtures("single_thread")

EXAMPLES = [  # different lengths and numbers of choices, so batches get padded
    MultipleChoiceExample("Which is a fruit?", ["apple", "stone", "cloud", "the cat"], 0, "t1", "a"),
    MultipleChoiceExample("Is the cat on the mat? yes or no", ["yes", "no"], 1, "t1", "b"),
    MultipleChoiceExample("a dog ran in the park. what ran?", ["red", "green", "a dog"], 2, "t2", "c"),
    MultipleChoiceExample("Colour?", ["blue", "true", "false", "green", "mat"], 3, "t2", "d"),
    MultipleChoiceExample("What sat on the mat in the park today?", ["the cat", "a dog"], 0, "t1", "e"),
]


class FakeLM(nn.Module):
    """A causal LM whose logits follow fixed token sequences.

    ``targets`` maps a prompt (token tuple) to the full sequence the model "believes"
    (prompt + an answer). At each real position t whose prefix matches that sequence, the logit of
    the believed next token is +20; everything else is 0 except ``decoy`` (+30 everywhere), a
    non-answer token that a protocol restricted to the right tokens must ignore. Records task_ids.
    """

    def __init__(self, targets: dict[tuple[int, ...], list[int]], vocab: int, decoy: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.targets, self.vocab, self.decoy = targets, vocab, decoy
        self.seen_task_ids: list[int] = []

    def forward(self, input_ids, attention_mask=None, position_ids=None, task_ids=None, **kwargs):
        assert not self.training and not torch.is_grad_enabled()
        if task_ids is not None:
            self.seen_task_ids += task_ids.tolist()
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.vocab)
        logits[:, :, self.decoy] = 30.0
        for b in range(B):
            real = [t for t in range(T) if attention_mask is None or attention_mask[b, t]]
            seq = input_ids[b, real].tolist()
            believed = next((full for prompt, full in self.targets.items() if tuple(seq[:len(prompt)]) == prompt), None)
            if believed is None:
                continue
            for k, t in enumerate(real):
                if seq[:k + 1] == believed[:k + 1] and k + 1 < len(believed):
                    logits[b, t, believed[k + 1]] = 20.0
        return SimpleNamespace(logits=logits + self.weight)


def fake_model(tokenizer, protocol: str, choose) -> FakeLM:
    """A FakeLM that answers ``choose(example)`` for every example under ``protocol``."""
    template = "mc_letters" if protocol == "label" else "mc_text"
    targets = {}
    for ex in EXAMPLES:
        prompt = encode_prompt(tokenizer, render_prompt(ex, template))
        answer = encode_continuation(tokenizer, render_targets(ex, template)[choose(ex)])
        targets[tuple(prompt)] = prompt + answer
    decoy = encode_continuation(tokenizer, " the")[0]
    return FakeLM(targets, len(tokenizer), decoy)


@pytest.mark.parametrize("protocol", ["label", "loglik"])
def test_always_gold_is_1_and_never_gold_is_0(protocol):
    tok = tiny_tokenizer()
    always = fake_model(tok, protocol, lambda ex: ex.gold)
    always.train()
    out = evaluate_multiple_choice(always, tok, EXAMPLES, protocol=protocol, batch_size=3, progress=False,
                                   task_ids={"t1": 0, "t2": 1})
    assert out["accuracy"] == 1.0 and out["n"] == 5 and out["predictions"] == [ex.gold for ex in EXAMPLES]
    assert out["per_task"] == {"t1": {"accuracy": 1.0, "n": 3}, "t2": {"accuracy": 1.0, "n": 2}}
    assert always.training  # training mode restored
    # task ids reach the model: one per prompt ("label") or per (example, choice) request ("loglik")
    per_example = lambda ex: ex.choices if protocol == "loglik" else [None]
    assert sorted(always.seen_task_ids) == sorted(0 if ex.task == "t1" else 1 for ex in EXAMPLES for _ in per_example(ex))
    never = fake_model(tok, protocol, lambda ex: (ex.gold + 1) % len(ex.choices))
    out = evaluate_multiple_choice(never, tok, EXAMPLES, protocol=protocol, batch_size=2, progress=False)
    assert out["accuracy"] == 0.0 and never.seen_task_ids == []


def reference_scores(model, tok, ex: MultipleChoiceExample, protocol: str) -> list[float]:
    """One example at a time, no padding: the simplest possible implementation of each protocol."""
    if protocol == "label":
        ids = encode_prompt(tok, render_prompt(ex, "mc_letters"))
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        letters = [tok(" " + "ABCDE"[i], add_special_tokens=False)["input_ids"][0] for i in range(len(ex.choices))]
        return [float(logits[i]) for i in letters]
    scores = []
    prompt = encode_prompt(tok, render_prompt(ex, "mc_text"))
    for target in render_targets(ex, "mc_text"):
        cont = encode_continuation(tok, target)
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + cont])).logits[0], -1)
        total = sum(float(logp[len(prompt) - 1 + k, c]) for k, c in enumerate(cont))
        scores.append(total / len(cont))  # token normalisation (the default)
    return scores


def continuation_passes(protocol: str, model: nn.Module, monkeypatch) -> list[int]:
    """For ``protocol`` "loglik-groups": every continuation length its own pass (a pass costs nothing to
    ``padded_groups``), and the returned list fills with the row count of each forward that continues a cache."""
    forwards: list[int] = []
    if protocol == "loglik-groups":
        from loramix.evaluate import accuracy

        monkeypatch.setattr(accuracy, "CONTINUATION_PASS_POSITIONS", 0)
        model.register_forward_pre_hook(
            lambda m, a, kw: forwards.append(len(kw["input_ids"])) if kw.get("past_key_values") is not None
            and kw["past_key_values"].get_seq_length() > 0 else None, with_kwargs=True)
    return forwards


@pytest.mark.parametrize("family", ["llama", "gpt2", "llama+mixlora"])  # rotary and absolute positions
@pytest.mark.parametrize("protocol", ["label", "loglik", "loglik-groups", "loglik-full"])
def test_batched_scores_match_reference(family, protocol, monkeypatch):
    """Batched, padded scoring (and, for loglik, the shared-prompt KV-cache path, its continuations in one pass or
    in a pass per length) equals scoring each sequence alone; also with a MixLoRA adapter whose router sees padded
    batches."""
    tok = tiny_tokenizer()
    if family == "gpt2":
        model = tiny_model("gpt2", vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    else:
        model = tiny_model("llama", vocab_size=len(tok))
    if family.endswith("mixlora"):
        from loramix import MixLoraConfig, inject

        model = inject(model, MixLoraConfig(r=4, alpha=8, num_experts=4, top_k=2, dropout=0.0))
        perturb_adapter(model, seed=0, every_std=0.3)
    passes = continuation_passes(protocol, model, monkeypatch)
    kind = protocol.split("-")[0]
    out = evaluate_multiple_choice(model, tok, EXAMPLES, protocol=kind, batch_size=3,
                                   progress=False, share_prompt=not protocol.endswith("-full"))
    if protocol == "loglik-groups":  # 2 batches of prompts, and several lengths of continuation in each
        assert len(passes) > 2 and sum(passes) == sum(len(encode_continuation(tok, t)) > 1 for ex in EXAMPLES
                                                      for t in render_targets(ex, "mc_text"))
    with torch.no_grad():
        ref = [reference_scores(model, tok, ex, kind) for ex in EXAMPLES]
    for got, want in zip(out["scores"], ref):
        assert got == pytest.approx(want, abs=1e-4)
    assert out["predictions"] == [max(range(len(s)), key=s.__getitem__) for s in ref]
    if protocol == "loglik":  # other normalisations rescale the same sums
        chars = evaluate_multiple_choice(model, tok, EXAMPLES, protocol="loglik", normalize="char", progress=False)
        for ex, got, want in zip(EXAMPLES, chars["scores"], ref):
            n_tok = [len(encode_continuation(tok, t)) for t in render_targets(ex, "mc_text")]
            n_chr = [len(t) for t in render_targets(ex, "mc_text")]
            assert got == pytest.approx([w * a / b for w, a, b in zip(want, n_tok, n_chr)], abs=1e-4)


def test_errors():
    tok = tiny_tokenizer()
    model = fake_model(tok, "label", lambda ex: ex.gold)
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_multiple_choice(model, tok, EXAMPLES, protocol="nope")
    with pytest.raises(KeyError, match="no entry for task"):
        evaluate_multiple_choice(model, tok, EXAMPLES, task_ids={"t1": 0}, progress=False)


def test_eval_command_on_local_folder(tmp_path):
    """`loramix eval` end to end: a tiny model folder + a multiple-choice JSONL file."""
    from loramix.cli import main

    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "quiz.jsonl"
    data.write_text("\n".join(json.dumps({"question": ex.question, "choices": ex.choices, "answer": ex.gold})
                              for ex in EXAMPLES))
    out = tmp_path / "out.json"
    code = main(["eval", "--model", str(tmp_path / "model"), "--tasks", str(data), "--protocol", "both",
                 "--batch-size", "2", "--json", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    for protocol in ("label", "loglik"):
        result = report["results"][str(data)][protocol]
        assert result["n"] == 5 and 0.0 <= result["accuracy"] <= 1.0
    assert main(["eval", "--model", str(tmp_path / "model"), "--tasks", "piqa", "--split", "test"]) == 2

    # with a MixLoRA adapter (non-zero weights, so it changes the scores): the CLI loads it on the base
    from loramix import MixLoraConfig, inject, save_adapter

    model.config._name_or_path = str(tmp_path / "model")
    adapted = inject(model, MixLoraConfig(r=4, alpha=8, num_experts=4, top_k=2))
    perturb_adapter(adapted, seed=1, every_std=0.5)
    save_adapter(adapted, tmp_path / "adapter")
    examples = load_examples(str(data))
    want = {p: evaluate_multiple_choice(adapted, tok, examples, protocol=p, progress=False)["accuracy"]
            for p in ("label", "loglik")}
    code = main(["eval", "--adapter", str(tmp_path / "adapter"), "--tasks", str(data), "--json", str(out),
                 "--no-progress"])  # base model read from the adapter's config
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"] == str(tmp_path / "model")
    assert {p: report["results"][str(data)][p]["accuracy"] for p in want} == want


@pytest.mark.slow
def test_smoke_real_smollm2_arc_e():
    from loramix.hub import load_model

    model, tok = load_model("smollm2-135m")
    ids = label_token_ids(tok, [" A", " B", " C", " D", " E"])
    assert len(set(ids)) == 5  # single, distinct tokens after "Answer:"
    for letter, i in zip("ABCDE", ids):
        assert tok.decode([i]) == " " + letter
    examples = load_examples("arc-e", "validation", limit=20)
    for protocol in ("label", "loglik"):
        out = evaluate_multiple_choice(model, tok, examples, protocol=protocol, batch_size=8, progress=False)
        assert out["n"] == 20 and 0.0 <= out["accuracy"] <= 1.0 and not math.isnan(out["accuracy"])
        assert out["accuracy"] == sum(p == ex.gold for p, ex in zip(out["predictions"], examples)) / 20


# ------------------------------------------------------------------ several adapters in one pass

def _multi_model(tok, seed: int = 0):
    """A tiny llama with three adapters of different kinds (random non-zero weights): LoRA, MixLoRA, MoRE."""
    from loramix import LoraConfig, MixLoraConfig, MoreConfig, inject_many

    base = tiny_model("llama", seed, vocab_size=len(tok))
    model = inject_many(base, {
        "lora": LoraConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "up_proj"]),
        "mix": MixLoraConfig(r=4, alpha=8, num_experts=4, top_k=2, dropout=0.0),
        "more": MoreConfig(max_rank=4, dropout=0.0, tasks=["t1", "t2"]),
    })
    perturb_adapter(model, seed=seed, every_std=0.3)
    return model


@pytest.mark.parametrize("protocol", ["label", "loglik", "loglik-groups", "loglik-full"])
def test_one_pass_over_several_adapters_equals_each_alone(protocol, monkeypatch):
    """``evaluate_many`` (mixed batches, rows grouped per adapter) gives every adapter the scores and
    choices of evaluating it alone under ``only_adapter``; the batches really mix adapters."""
    from loramix import only_adapter
    from loramix.evaluate import evaluate_many

    tok = tiny_tokenizer()
    model = _multi_model(tok)
    requests = {"lora": EXAMPLES, "mix": EXAMPLES[1:], "more": EXAMPLES[::-1]}
    tasks = {"more": {"t1": 0, "t2": 1}}
    plans = []
    spy = model.register_forward_pre_hook(lambda m, a, kw: plans.append(kw.get("adapter_rows")), with_kwargs=True,
                                          prepend=True)
    kind, share = protocol.split("-")[0], not protocol.endswith("-full")
    passes = continuation_passes(protocol, model, monkeypatch)
    one = evaluate_many(model, tok, requests, protocol=kind, batch_size=3, progress=False, task_ids=tasks,
                        share_prompt=share)
    spy.remove()
    assert protocol != "loglik-groups" or len(passes) > 2
    assert any(len({name for name, _ in plan}) > 1 for plan in plans)  # one pass: adapters share batches
    for plan in plans:  # each adapter's rows together
        names = [name for name, _ in plan]
        assert len(names) == len(set(names))
    for name, exs in requests.items():
        with only_adapter(model, name):
            alone = evaluate_multiple_choice(model, tok, exs, protocol=kind, batch_size=3, progress=False,
                                             task_ids=tasks.get(name), share_prompt=share)
        assert one[name]["predictions"] == alone["predictions"], name
        assert one[name]["per_task"] == alone["per_task"] and one[name]["n"] == len(exs)
        for got, want in zip(one[name]["scores"], alone["scores"]):
            assert got == pytest.approx(want, abs=1e-5), name
    # the adapters do differ, so a row sent to the wrong adapter would show
    assert one["lora"]["scores"][1] != pytest.approx(one["mix"]["scores"][0], abs=1e-3)
    assert one["lora"]["scores"][0] != pytest.approx(one["more"]["scores"][-1], abs=1e-3)


def test_one_pass_errors():
    from loramix.evaluate import evaluate_many

    tok = tiny_tokenizer()
    model = _multi_model(tok)
    with pytest.raises(KeyError, match="no adapter"):
        evaluate_many(model, tok, {"nope": EXAMPLES}, progress=False)
    with pytest.raises(ValueError, match="needs task ids|needs the task"):  # MoRE without task ids or default
        evaluate_many(model, tok, {"more": EXAMPLES, "lora": EXAMPLES}, progress=False)
    with pytest.raises(ValueError, match="several adapters"):
        evaluate_many(fake_model(tok, "label", lambda ex: ex.gold), tok, {"a": EXAMPLES})


def test_eval_command_several_adapters_in_one_pass(tmp_path):
    """`loramix eval --adapter a=... --adapter b=... --adapter c=...` prints per-adapter, per-task
    accuracy equal to evaluating each saved adapter alone with the single-adapter command."""
    from loramix import only_adapter, save_adapter
    from loramix.cli import main
    from loramix.models.many import member_parameters

    tok = tiny_tokenizer()
    joint = _multi_model(tok, seed=3)
    base = tiny_model("llama", 3, vocab_size=len(tok))
    base.config._name_or_path = str(tmp_path / "model")
    base.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = tmp_path / "quiz.jsonl"
    data.write_text("\n".join(json.dumps({"question": ex.question, "choices": ex.choices, "answer": ex.gold,
                                          "task": ex.task}) for ex in EXAMPLES))
    import loramix

    for name, config in joint.loramix_many.adapters.items():  # each adapter's weights, saved alone
        single = loramix.inject(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "model"), config.config)
        with torch.no_grad():
            mine = loramix.adapter_parameters(single)
            for key, value in member_parameters(joint, name).items():
                mine[key].copy_(value)
        save_adapter(single, tmp_path / name / "adapter")
    out = tmp_path / "many.json"
    args = ["eval", "--tasks", str(data), "--batch-size", "2", "--no-progress"]
    code = main(args + ["--adapter", f"lora={tmp_path / 'lora' / 'adapter'}", "--adapter", str(tmp_path / "mix" / "adapter"),
                        "--adapter", f"more={tmp_path / 'more' / 'adapter'}", "--json", str(out)])
    assert code == 0
    many = json.loads(out.read_text())
    assert many["model"] == str(tmp_path / "model") and set(many["adapters"]) == {"lora", "mix", "more"}
    # reference: the single-adapter command for the MoRE adapter (its task ids come from its config),
    # each adapter alone in this process for the others
    single = tmp_path / "more.json"
    assert main(args + ["--adapter", str(tmp_path / "more" / "adapter"), "--json", str(single)]) == 0
    alone = {"more": json.loads(single.read_text())["results"][str(data)]}
    examples = load_examples(str(data))
    for name in ("lora", "mix"):
        with only_adapter(joint, name):
            alone[name] = {p: evaluate_multiple_choice(joint, tok, examples, protocol=p, batch_size=2, template=None,
                                                       progress=False) for p in ("label", "loglik")}
    for name in ("lora", "mix", "more"):
        got = many["results"][name]
        assert set(got) == {str(data)}
        for protocol in ("label", "loglik"):
            assert got[str(data)][protocol]["n"] == alone[name][protocol]["n"] == 5
            assert got[str(data)][protocol]["accuracy"] == alone[name][protocol]["accuracy"], (name, protocol)
    assert main(args + ["--adapter", f"a={tmp_path / 'lora' / 'adapter'}", "--adapter",
                        f"a={tmp_path / 'mix' / 'adapter'}"]) == 2  # two adapters named alike
