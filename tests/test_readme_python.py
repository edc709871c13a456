"""The README's Python snippets run as written, so they cannot drift (issue 21 case 12: they used an
undefined ``model_path``, ``ids``, ``base``, ..., and a comment offered ``loramix.hub.load_model`` where
a model goes, which returns ``(model, tokenizer)``).

- Every name a snippet reads is a builtin or defined by it or by an earlier snippet (README order):
  checked by the compiler's symbol tables, for every snippet, those that need a download or a server too.
- The Quick start's snippets run, in order, in one namespace, in a scratch folder, on a 2-layer model
  standing in for the embedded SmolLM2 (``embedded_stand_in``: ``$LORAMIX_CACHE`` holds it as the
  converted folder, so ``loramix.hub.embedded_folder`` and ``load_model("smollm2-135m")`` mean it).
  The 'With Trainer, TRL and lm-eval' snippets run in ``test_hf_trainer.py`` and ``test_lm_eval.py``.
"""

from __future__ import annotations

import builtins
import math
import re
import symtable
import textwrap
from pathlib import Path

import pytest
import torch

import loramix

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.usefixtures("single_thread")


def python_snippets(section: str | None = None) -> list[str]:
    """The README's ```python blocks, in order; with ``section``, those of that ``## `` section only."""
    text = README.read_text()
    if section is not None:
        text = text[text.index(f"## {section}\n"):]
        text = text[:text.index("\n## ", 1)]
    # a block inside a list item is indented like the item's text: as Markdown does, take the fence's indent off
    return [textwrap.dedent(body) for body in re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", text, flags=re.S | re.M)]


def _reads_and_defines(code: str) -> tuple[set[str], set[str]]:
    """The global names ``code`` reads (in any scope: comprehensions and lambdas included) and those it
    binds at module level (assignments, imports, loop and ``with`` targets, defs)."""
    top = symtable.symtable(code, "README.md", "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    reads, tables = set(), [top]
    while tables:
        table = tables.pop()
        tables.extend(table.get_children())
        for sym in table.get_symbols():
            if sym.is_referenced() and (table is top or sym.is_global()):
                reads.add(sym.get_name())
    return reads, defined


def test_every_name_a_readme_snippet_reads_is_defined_before():
    defined, undefined = set(dir(builtins)), []
    snippets = python_snippets()
    assert len(snippets) >= 8
    for number, code in enumerate(snippets, 1):
        reads, binds = _reads_and_defines(code)
        defined |= binds
        undefined += [f"snippet {number} ({code.splitlines()[0][:60]}...): {name}" for name in sorted(reads - defined)]
    assert not undefined, "README Python snippets read names nothing defines:\n" + "\n".join(undefined)


def test_the_quick_start_snippets_run_as_written(tmp_path, monkeypatch, embedded_stand_in):
    snippets = python_snippets("Quick start (Python)")
    assert len(snippets) == 3
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in snippets:
        exec(compile(code, "README.md", "exec"), scope)
    assert Path(scope["model_path"]) == embedded_stand_in
    assert math.isfinite(float(scope["losses"]["a"]["loss"])) and set(scope["losses"]) == {"a", "b"}
    for folder in ("out/adapter", "out/boolq-peft", "out/a", "out/b"):
        assert (tmp_path / folder / "adapter_config.json").is_file(), folder
    # what the last line loaded is what the stacked model saved
    assert set(scope["model"].loramix_many.adapters) == {"a", "b"}
    assert scope["base_logits"].shape[:2] == scope["ids"].shape


def test_inject_says_to_unpack_what_load_model_returns(embedded_stand_in):
    """The old Quick start comment put load_model(...) where a model goes: inject failed with "model family
    'None' is not supported"."""
    pair = loramix.hub.load_model("smollm2-135m")
    with pytest.raises(TypeError, match=r"got a tuple: loramix.hub.load_model returns \(model, tokenizer\); "
                                        r"unpack it"):
        loramix.inject(pair, loramix.LoraConfig(r=2))
    model, _ = pair
    assert loramix.inject(model, loramix.LoraConfig(r=2)) is model  # unpacked, it works
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)
