"""Multiple-choice accuracy with the two protocols of the commonsense benchmarks.

``protocol="label"`` (the MixLoRA paper's): the prompt lists the options with letters
("<question> (A) x (B) y\\nAnswer:"); the prediction is the argmax of the logits at the *last prompt
position*, restricted to the letter tokens (" A", " B", ... as the tokenizer splits them after
"Answer:"). Batches are padded on the LEFT so the last position is the last prompt token of every
row; position ids are computed from the attention mask so padding does not shift positions.

``protocol="loglik"``: the prompt is the bare question ("<question>\\nAnswer:"); each choice
" <text>" is scored by the sum of its tokens' log-probabilities given the prompt, divided by its
number of *tokens* (``normalize="token"``, the default; "char" divides by its characters like
lm-eval's ``acc_norm``, "none" keeps the sum); the prediction is the argmax. On the first 80
ARC-e validation rows with SmolLM2-135M-Instruct: token 0.44, char 0.31, none 0.50. Requests are
left-padded too, so all continuations end at the last position and only the tail needs logits.

Example:
    >>> evaluate_multiple_choice(model, tokenizer, load_examples("arc-e", "validation"), protocol="label")
    {'accuracy': ..., 'n': 570, 'per_task': {'arc-e': {'accuracy': ..., 'n': 570}}, 'protocol': 'label', ...}
"""

from __future__ import annotations

import copy
import inspect
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..data.batching import check_pad_token, collate, padded_groups
from ..data.examples import MultipleChoiceExample
from ..data.tokenize import (
    LETTERS, encode_continuation, encode_prompt, render_prompt, render_targets, special_prefix, truncate_left,
)
from ..models.inject import inference_only_calls
from ..models.many import row_plan

PROTOCOLS = ("label", "loglik")
NORMALIZATIONS = ("token", "char", "none")
# the template each protocol uses when the caller leaves the default
DEFAULT_TEMPLATES = {"label": "mc_letters", "loglik": "mc_text"}
# What one more continuation pass costs, in padded positions (``padded_groups``): a forward reads every weight once
# whatever its rows (SmolLM2-135M, 2 CPU threads, after a 60-token prompt cache: about 50 ms + 2.1 ms per position).
CONTINUATION_PASS_POSITIONS = 32


def label_token_ids(tokenizer, targets: Sequence[str], after: str = "Answer:") -> list[int]:
    """The single token id of each label target (e.g. " A") as the tokenizer splits it after ``after``.

    Tokenising " A" on its own can differ from how it is split inside "Answer: A" (SentencePiece
    prefixes, merges), so the id is read from the tokenisation of ``after + target``. A target that
    is not exactly one token there raises ``ValueError``: the label protocol needs one logit per option.
    """
    base = encode_continuation(tokenizer, after)
    ids = []
    for target in targets:
        full = encode_continuation(tokenizer, after + target)
        rest = full[len(base):] if full[:len(base)] == base else None
        if rest is None or len(rest) != 1:
            alone = encode_continuation(tokenizer, target)
            if len(alone) != 1:
                raise ValueError(f"label target {target!r} is not a single token for this tokenizer "
                                 f"(after {after!r}: {full}); use protocol='loglik'")
            rest = alone
        ids.append(rest[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"label targets {list(targets)} map to repeated token ids {ids}")
    return ids


def _accepts(model: torch.nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def _forward(model, batch: dict[str, torch.Tensor], device: torch.device, route: dict[str, Any], keep: int,
             **extra: Any) -> tuple[torch.Tensor, Any]:
    """(logits (B, keep, V) of the last ``keep`` positions of a left-padded batch, the model's whole output).

    Position ids are computed from the attention mask so left padding does not shift positions.
    Models that accept ``logits_to_keep`` (Hugging Face causal LMs) project only those positions
    through the output layer, which saves B*T*V memory on long prompts. ``extra``: more model
    arguments (``use_cache=True`` for the shared-prompt pass).
    """
    mask = batch["attention_mask"].to(device)
    kwargs: dict[str, Any] = dict(input_ids=batch["input_ids"].to(device), attention_mask=mask, **route, **extra)
    if _accepts(model, "position_ids"):
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if _accepts(model, "logits_to_keep"):
        kwargs["logits_to_keep"] = keep
    out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -keep:, :], out


class _RowOwners:
    """Whose each example's rows are: the adapter of a multi-adapter model and the task id (MoRE).
    (Not a router's decision, ``modules.routing.Routing``: a plan fixed before the forward.)

    Args:
        adapters: adapter name per example, or None for a model with one adapter (or none).
        tasks: task id per example (-1: none for that example's adapter), or None for no task ids.
    """

    def __init__(self, adapters: list[str] | None, tasks: list[int] | None) -> None:
        self.adapters, self.tasks = adapters, tasks
        self.rank = {name: i for i, name in enumerate(dict.fromkeys(adapters))} if adapters else {}

    def group(self, items: list, example: Callable[[Any], int] = lambda i: i) -> list:
        """``items`` reordered so each adapter's are consecutive (stable: order kept inside);
        ``example(item)`` is the item's example index (the item itself by default)."""
        return sorted(items, key=lambda it: self.rank[self.adapters[example(it)]]) if self.adapters else items

    def kwargs(self, idx: list[int], device: torch.device) -> dict[str, Any]:
        """Model keyword arguments for a batch whose rows are examples ``idx`` (grouped), in order."""
        out: dict[str, Any] = {}
        if self.tasks is not None:
            out["task_ids"] = torch.tensor([self.tasks[i] for i in idx], dtype=torch.long, device=device)
        if self.adapters:
            out["adapter_rows"] = row_plan(self.adapters[i] for i in idx)
        return out


def _task_list(examples: Sequence[MultipleChoiceExample], task_ids: dict[str, int] | None) -> list[int] | None:
    if task_ids is None:
        return None
    missing = sorted({ex.task for ex in examples} - set(task_ids))
    if missing:
        raise KeyError(f"task_ids has no entry for task(s) {missing}; it maps {sorted(task_ids)}")
    return [task_ids[ex.task] for ex in examples]


def _predict_label(model, tokenizer, examples, template, batch_size, cutoff_len, routing, device,
                   progress) -> list[list[float]]:
    prefix = special_prefix(tokenizer)
    letter_ids: dict[int, list[int]] = {}  # number of choices -> label token ids
    prompts = []
    for ex in examples:
        ids = encode_prompt(tokenizer, render_prompt(ex, template), max_tokens=cutoff_len)
        ids, _ = truncate_left(ids, [], cutoff_len, keep_first=len(prefix))
        prompts.append(ids)
        n = len(ex.choices)
        if n not in letter_ids:
            letter_ids[n] = label_token_ids(tokenizer, render_targets(
                MultipleChoiceExample("", [""] * n, 0, "", ""), template))
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))  # similar lengths together
    scores: list[list[float]] = [[] for _ in examples]
    bar = tqdm(total=len(order), desc="eval (label)", unit="ex", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = routing.group(order[start:start + batch_size])
        batch = collate([{"input_ids": prompts[i]} for i in idx], tokenizer.pad_token_id, padding_side="left")
        last = _forward(model, batch, device, routing.kwargs(idx, device), keep=1)[0][:, -1, :].float()  # (B, V)
        for row, i in enumerate(idx):
            scores[i] = last[row, letter_ids[len(examples[i].choices)]].tolist()
        bar.update(len(idx))
    bar.close()
    return scores


def _predict_loglik(model, tokenizer, examples, template, batch_size, cutoff_len, routing, device,
                    progress) -> list[list[float]]:
    prefix = special_prefix(tokenizer)
    requests = []  # one per (example, choice): (example index, choice index, prompt + continuation ids, len(cont))
    for e, ex in enumerate(examples):
        prompt = encode_prompt(tokenizer, render_prompt(ex, template), max_tokens=cutoff_len)
        for c, target in enumerate(render_targets(ex, template)):
            cont = encode_continuation(tokenizer, target, max_tokens=cutoff_len)
            p, cont = truncate_left(prompt, cont, cutoff_len, keep_first=len(prefix))
            requests.append((e, c, p + cont, len(cont)))
    scores = [[float("-inf")] * len(ex.choices) for ex in examples]
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    bar = tqdm(total=len(order), desc="eval (loglik)", unit="choice", disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        # rows grouped by adapter; a request's adapter is its example's
        chunk = routing.group([requests[r] for r in order[start:start + batch_size]], example=lambda req: req[0])
        # left padding: every row ends with its continuation, so only the last K = max(n_cont) + 1
        # positions need logits (position t predicts token t+1)
        batch = collate([{"input_ids": ids} for _, _, ids, _ in chunk], tokenizer.pad_token_id, padding_side="left")
        keep = max(n for *_, n in chunk) + 1
        route = routing.kwargs([e for e, *_ in chunk], device)
        logits, _ = _forward(model, batch, device, route, keep=keep)  # (B, K, V)
        for row, (e, c, ids, n_cont) in enumerate(chunk):
            pred_logits = logits[row, keep - n_cont - 1:keep - 1, :].float()
            targets = torch.tensor(ids[len(ids) - n_cont:], device=pred_logits.device)
            logp = torch.log_softmax(pred_logits, dim=-1).gather(-1, targets[:, None]).sum()
            scores[e][c] = float(logp)  # raw sum: normalised by the caller
        bar.update(len(chunk))
    bar.close()
    return scores


def _supports_shared_prompt(model) -> bool:
    """Whether the model takes a KV cache (Hugging Face causal LMs do; bare test modules don't)."""
    return all(_accepts(model, name) for name in ("past_key_values", "use_cache", "position_ids"))


def _predict_loglik_shared(model, tokenizer, examples, template, batch_size, cutoff_len, routing, device,
                           progress) -> list[list[float]]:
    """Same scores as ``_predict_loglik``, computing each prompt once for all its choices.

    Pass 1 runs the left-padded prompts with ``use_cache=True``: the last position's logits give the
    first continuation token's log-prob. Pass 2 takes the choices of more than one token, in groups of
    similar lengths (``padded_groups``: choices of 1 to 20 tokens padded to the longest of the batch were
    3× the real tokens on ARC-e), each with its own copy of its prompts' KV cache, repeated once per choice.
    A group runs its right-padded continuations less their last token (whose logits predict nothing) after
    the prompts (attention mask = prompt mask + continuation mask, positions continue from each prompt's
    real length), giving the remaining tokens' log-probs.
    """
    prefix = special_prefix(tokenizer)
    items = []  # (example index, prompt ids, [continuation ids per choice])
    for e, ex in enumerate(examples):
        prompt = encode_prompt(tokenizer, render_prompt(ex, template), max_tokens=cutoff_len)
        conts = [encode_continuation(tokenizer, t, max_tokens=cutoff_len) for t in render_targets(ex, template)]
        prompt, _ = truncate_left(prompt, max(conts, key=len), cutoff_len, keep_first=len(prefix))
        conts = [c[: max(cutoff_len - len(prompt), 1)] for c in conts]  # only if a choice alone overflows
        items.append((e, prompt, conts))
    items.sort(key=lambda it: -len(it[1]))
    scores = [[float("-inf")] * len(ex.choices) for ex in examples]
    bar = tqdm(total=sum(len(ex.choices) for ex in examples), desc="eval (loglik)", unit="choice",
               disable=not progress, leave=False)
    for start in range(0, len(items), batch_size):
        # batch_size prompts in pass 1; their (prompt, choice) rows (short continuations) in pass 2
        chunk = routing.group(items[start:start + batch_size], example=lambda it: it[0])
        batch = collate([{"input_ids": p} for _, p, _ in chunk], tokenizer.pad_token_id, padding_side="left")
        route = routing.kwargs([e for e, *_ in chunk], device)
        last, out = _forward(model, batch, device, route, keep=1, use_cache=True)
        first_logp = torch.log_softmax(last[:, -1, :].float(), dim=-1)  # (E, V)
        # pass-2 rows: (prompt k of the chunk, choice c, its continuation ids), in chunk order (grouped by adapter)
        rows = [(k, c, cont) for k, (_, _, conts) in enumerate(chunk) for c, cont in enumerate(conts)]
        firsts = first_logp[[k for k, _, _ in rows], [cont[0] for *_, cont in rows]].tolist()
        for (k, c, _), first in zip(rows, firsts):
            scores[chunk[k][0]][c] = first  # raw sums: normalised by the caller
        longer = [row for row in rows if len(row[2]) > 1]
        groups = padded_groups([len(cont) - 1 for *_, cont in longer], CONTINUATION_PASS_POSITIONS)
        mask = batch["attention_mask"].to(device)
        for g, group in enumerate(groups):
            part = [longer[i] for i in group]  # ascending: chunk order, still grouped by adapter
            # the last group takes pass 1's cache itself, the others a copy (a pass grows its cache in place)
            cache = out.past_key_values if g == len(groups) - 1 else copy.deepcopy(out.past_key_values)
            rest = _continuation_logp(model, cache, mask, part, [chunk[k][0] for k, _, _ in part], routing,
                                      tokenizer.pad_token_id, device)
            for (k, c, _), value in zip(part, rest):
                scores[chunk[k][0]][c] += value
        bar.update(len(rows))
    bar.close()
    return scores


def _continuation_logp(model, cache: Any, prompt_mask: torch.Tensor, rows: list[tuple[int, int, list[int]]],
                       owners: list[int], routing: _RowOwners, pad_id: int, device: torch.device) -> list[float]:
    """Σ log p(cont[j] | prompt, cont[:j]) over j ≥ 1 of each row (k, c, cont) after its prompt k's KV cache.

    cache: pass 1's cache of the chunk's prompts (B prompts), consumed: repeated per row and grown. prompt_mask:
    (B, P) their left-padded attention mask. owners: each row's example index (its adapter and task)."""
    select = torch.tensor([k for k, _, _ in rows], device=device)
    cache.batch_select_indices(select)  # repeat each prompt's keys/values once per row
    inputs = collate([{"input_ids": cont[:-1]} for *_, cont in rows], pad_id)  # right padding
    ids = inputs["input_ids"].to(device)
    prompt_len = prompt_mask.sum(-1)[select]  # real prompt tokens per row
    kwargs = dict(input_ids=ids, past_key_values=cache, use_cache=True,
                  attention_mask=torch.cat([prompt_mask[select], inputs["attention_mask"].to(device)], dim=-1),
                  position_ids=prompt_len[:, None] + torch.arange(ids.shape[1], device=device)[None, :])
    kwargs.update(routing.kwargs(owners, device))
    logits = model(**kwargs).logits  # (R, C, V): position j predicts continuation token j + 1
    out = []
    for row, (*_, cont) in enumerate(rows):
        lp = torch.log_softmax(logits[row, : len(cont) - 1, :].float(), dim=-1)
        out.append(float(lp.gather(-1, torch.tensor(cont[1:], device=lp.device)[:, None]).sum()))
    return out


def evaluate_multiple_choice(model, tokenizer, examples: Sequence[MultipleChoiceExample], *, protocol: str = "label",
                             batch_size: int = 8, template: str | None = "mc_letters", progress: bool = True,
                             task_ids: dict[str, int] | None = None, cutoff_len: int = 1024,
                             share_prompt: bool = True, normalize: str = "token") -> dict[str, Any]:
    """Accuracy of ``model`` on multiple-choice ``examples``.

    Args:
        model: a causal LM (base or with a loramix adapter) returning ``.logits`` of shape (B, T, V).
        tokenizer: its tokenizer (needs a pad token; ``load_model`` sets one).
        examples: ``MultipleChoiceExample`` objects (e.g. ``load_examples("arc-e", "validation")``).
        protocol: "label" (logits of the option letters at the last prompt position) or "loglik"
            (length-normalised log-likelihood of each choice's text, see ``normalize``).
        batch_size: prompts per forward pass ("loglik" without ``share_prompt``: prompt+choice sequences).
        template: prompt template; the default "mc_letters" is replaced by "mc_text" for "loglik"
            (``None`` also picks the protocol's default).
        progress: show a tqdm bar.
        task_ids: task name -> id, passed to the model as ``task_ids`` (MoRE adapters).
        cutoff_len: longest sequence; prompts are cut from the left beyond it.
        normalize: "loglik" only: divide each choice's log-likelihood by its number of "token"s
            (default), "char"acters, or not at all ("none").
        share_prompt: "loglik" only: run each prompt once and reuse its KV cache for all its
            choices (same scores, ~number-of-choices times less prompt compute) when the model
            accepts ``past_key_values``; False runs every (prompt + choice) sequence in full.

    Returns:
        ``{"accuracy": float, "n": int, "per_task": {task: {"accuracy", "n"}}, "protocol": str,
        "predictions": list[int], "scores": list[list[float]]}`` (per example and choice: the label
        logit, or the normalised log-likelihood). The model's training mode is restored afterwards.
    """
    return _evaluate(model, tokenizer, {_ALONE: examples}, {_ALONE: task_ids}, routed=False, protocol=protocol,
                     batch_size=batch_size, template=template, progress=progress, cutoff_len=cutoff_len,
                     share_prompt=share_prompt, normalize=normalize)[_ALONE]


def evaluate_many(model, tokenizer, examples: dict[str, Sequence[MultipleChoiceExample]], *, protocol: str = "label",
                  batch_size: int = 8, template: str | None = "mc_letters", progress: bool = True,
                  task_ids: dict[str, dict[str, int] | None] | None = None, cutoff_len: int = 1024,
                  share_prompt: bool = True, normalize: str = "token") -> dict[str, dict[str, Any]]:
    """Accuracy of several adapters of one multi-adapter model (``inject_many``), in one pass.

    Every adapter's requests go into the same stream of batches (sorted by length, as for one
    adapter); inside a batch the rows are grouped by adapter and the batch is called with the
    matching ``adapter_rows`` plan, so each frozen matmul runs once for all adapters. The scores
    equal ``evaluate_multiple_choice`` under ``only_adapter(model, name)`` for each adapter (up to
    float rounding of differently padded batches).

    Args:
        model: a model from ``inject_many`` (``model.loramix_many``).
        examples: adapter name → its multiple-choice examples (an adapter may be listed with the same
            examples as another: e.g. two adapters on one benchmark).
        task_ids: adapter name → {task name → id} for task-routed (MoRE) adapters; adapters missing
            here (or mapped to None) get no task ids.
        protocol, batch_size, template, progress, cutoff_len, share_prompt, normalize: as for
            ``evaluate_multiple_choice`` (one setting for all adapters).

    Returns:
        Adapter name → the dict ``evaluate_multiple_choice`` returns for that adapter.

    Example:
        >>> model = inject_many(base, {"a": cfg_a, "b": cfg_b})   # then load each adapter's weights
        >>> out = evaluate_many(model, tokenizer, {"a": arc_e, "b": arc_e}, protocol="loglik")
        >>> out["a"]["accuracy"], out["b"]["per_task"]
    """
    state = getattr(model, "loramix_many", None)
    if state is None:
        raise ValueError("evaluate_many needs a model with several adapters (loramix.inject_many); "
                         "use evaluate_multiple_choice for one model")
    unknown = [name for name in examples if name not in state.adapters]
    if unknown:
        raise KeyError(f"no adapter(s) {unknown} in this model; it has {list(state.adapters)}")
    task_ids = task_ids or {}
    unknown = [name for name in task_ids if name not in examples]
    if unknown:
        raise KeyError(f"task_ids names adapter(s) {unknown} that have no examples here")
    return _evaluate(model, tokenizer, examples, task_ids, routed=True, protocol=protocol, batch_size=batch_size,
                     template=template, progress=progress, cutoff_len=cutoff_len, share_prompt=share_prompt,
                     normalize=normalize)


_ALONE = "model"  # the one set ``evaluate_multiple_choice`` hands ``_evaluate``


def _evaluate(model, tokenizer, examples: dict[str, Sequence[MultipleChoiceExample]],
              task_ids: dict[str, dict[str, int] | None], *, routed: bool, protocol: str, batch_size: int,
              template: str | None, progress: bool, cutoff_len: int, share_prompt: bool,
              normalize: str) -> dict[str, dict[str, Any]]:
    """The one evaluation of ``evaluate_multiple_choice`` (one set, ``routed=False``) and ``evaluate_many``: every
    set's requests in one stream of batches; set name → the summary of its examples.

    Args:
        examples: set name → its examples. task_ids: set name → {task → id}, or None / absent: no task ids
            (-1 on its rows when another set has them).
        routed: each batch is called with the ``adapter_rows`` plan of its rows, a set's name being its adapter's
            (``evaluate_many``); False: the model is called as it is (one set).
        The rest: as ``evaluate_multiple_choice``'s.
    """
    per_set = {name: list(exs) for name, exs in examples.items()}
    flat = [ex for exs in per_set.values() for ex in exs]
    template = _check(flat, tokenizer, protocol, template, normalize)
    owners = [name for name, exs in per_set.items() for _ in exs] if routed else None
    tasks = None
    if any(task_ids.get(name) is not None for name in per_set):  # -1: an adapter that takes no task ids
        tasks = [t for name, exs in per_set.items() for t in _task_list(exs, task_ids.get(name)) or [-1] * len(exs)]
    scores = _scores(model, tokenizer, flat, _RowOwners(owners, tasks), protocol=protocol, batch_size=batch_size,
                     template=template, progress=progress, cutoff_len=cutoff_len, share_prompt=share_prompt,
                     normalize=normalize) if flat else []
    results, start = {}, 0
    for name, exs in per_set.items():
        results[name] = _summary(exs, scores[start:start + len(exs)], protocol)
        start += len(exs)
    return results


def _check(examples: list, tokenizer, protocol: str, template: str | None, normalize: str) -> str:
    """Validate the arguments; returns the template to use."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{protocol}': use one of {', '.join(PROTOCOLS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"unknown normalize '{normalize}': use one of {', '.join(NORMALIZATIONS)}")
    bad = [ex for ex in examples if not isinstance(ex, MultipleChoiceExample)]
    if bad:
        raise TypeError(f"evaluate_multiple_choice needs multiple-choice examples; got {type(bad[0]).__name__} "
                        f"(id {getattr(bad[0], 'id', '?')})")
    if any(len(ex.choices) > len(LETTERS) for ex in examples):
        raise ValueError(f"at most {len(LETTERS)} choices per example are supported")
    if template is None or (protocol == "loglik" and template == "mc_letters"):
        template = DEFAULT_TEMPLATES[protocol]
    check_pad_token(tokenizer)
    return template


def _scores(model, tokenizer, examples: list[MultipleChoiceExample], routing: _RowOwners, *, protocol: str,
            batch_size: int, template: str, progress: bool, cutoff_len: int, share_prompt: bool,
            normalize: str) -> list[list[float]]:
    """Score of every choice of every example (normalised for "loglik"); training mode restored after. Only the
    logits are read: a plain adapter skips its auxiliary losses and router statistics (``inference_only_calls``)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), inference_only_calls(model):
            predict = (_predict_label if protocol == "label" else _predict_loglik_shared
                       if share_prompt and _supports_shared_prompt(model) else _predict_loglik)
            scores = predict(model, tokenizer, examples, template, batch_size, cutoff_len, routing, device, progress)
    finally:
        model.train(was_training)
    if protocol == "loglik" and normalize != "none":
        for ex, row in zip(examples, scores):
            targets = render_targets(ex, template)
            lengths = [len(encode_continuation(tokenizer, t)) if normalize == "token" else len(t) for t in targets]
            row[:] = [v / max(n, 1) for v, n in zip(row, lengths)]
    return scores


def _summary(examples: list[MultipleChoiceExample], scores: list[list[float]], protocol: str) -> dict[str, Any]:
    """Accuracy overall and per task from the scores (first maximum wins ties)."""
    if not examples:
        return {"accuracy": float("nan"), "n": 0, "per_task": {}, "protocol": protocol, "predictions": [], "scores": []}
    preds = [max(range(len(s)), key=s.__getitem__) for s in scores]  # first maximum on ties
    hits: dict[str, list[int]] = defaultdict(list)
    for ex, p in zip(examples, preds):
        hits[ex.task].append(int(p == ex.gold))
    per_task = {t: {"accuracy": sum(h) / len(h), "n": len(h)} for t, h in hits.items()}
    correct = sum(sum(h) for h in hits.values())
    return {"accuracy": correct / len(examples), "n": len(examples), "per_task": per_task, "protocol": protocol,
            "predictions": preds, "scores": scores}
