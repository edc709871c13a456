"""``loramix serve --merge``: one LoRA adapter folded into the base weights and served as the base's rows (a decode
step costs the bare base's); the answers are the merged model's own ``generate``; every refusal (not exactly one
adapter, a kind that does not merge, adapters loaded while serving, ``--adapter-dir``) is clear and leaves the model
as it was."""

from __future__ import annotations

import httpx2 as httpx  # the HTTP client the openai package uses (installed with it)
import openai
import pytest
import torch

import loramix
from conftest import model_fingerprint
from loramix.adapters import load_adapter
from loramix.hub import load_model
from loramix.serve.server.app import build_app, serve_in_thread
from loramix.serve.server.engine import BASE, Engine, load_served
from serve_fixtures import MAX_TOKENS

pytestmark = pytest.mark.usefixtures("single_thread")
PROMPTS = ["The sky is", "one two three", "hello"]


def merged_reference(base, folder) -> tuple[torch.nn.Module, object]:
    """The adapter loaded alone on a fresh base and merged (``merge_and_unload``), and the tokenizer."""
    model, tok = load_model(str(base))
    return loramix.merge_and_unload(load_adapter(model, folder)).eval(), tok


def greedy(model, tok, ids: list[int]) -> str:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_TOKENS,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)


def test_merged_server_answers_as_the_merged_model(folders):
    base, adapters = folders
    model, tok = load_model(str(base))
    served = load_served(model, tok, {"lora": adapters["lora"]}, base_name="base", merge=True)
    assert served.merged == "lora" and dict(served.targets) == {"lora": served.targets["lora"]}
    assert served.targets["lora"].adapter == BASE
    reference, ref_tok = merged_reference(base, adapters["lora"])
    # the merged weights (a projection under the base's stand-in keeps its weight as ``...q_proj.base.weight``)
    served_weights = {k.replace(".base.", "."): v for k, v in served.model.state_dict().items() if ".members." not in k}
    assert served_weights.keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(served_weights[key], value), key
    engine = Engine(served, max_batch_size=4)
    engine.start()
    try:
        with serve_in_thread(build_app(served, engine)) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            assert [m.id for m in client.models.list().data] == ["lora"]
            for prompt in PROMPTS:
                answer = client.completions.create(model="lora", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
                assert answer.choices[0].text == greedy(reference, ref_tok, served.prompt_ids(prompt))
            with pytest.raises(openai.NotFoundError):  # the bare base is not served
                client.completions.create(model="base", prompt="hi", max_tokens=2, temperature=0)
            refused = httpx.post(url + "/v1/adapters", json={"name": "mix", "folder": str(adapters["mix"])})
            assert refused.status_code == 400 and "merged into the base" in refused.text and "--merge" in refused.text
    finally:
        engine.stop()


def test_merge_refusals_leave_the_model_as_it_was(folders):
    base, adapters = folders
    model, tok = load_model(str(base))
    before = model_fingerprint(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [({"lora": adapters["lora"], "mix": adapters["mix"]}, "exactly one adapter"),
             ({}, "exactly one adapter"),
             ({"mix": adapters["mix"]}, "adapter 'mix' .* cannot be merged into the base .*MixLoRA"),
             ({"more": adapters["more"]}, "adapter 'more' .* cannot be merged into the base .*MoRE"),
             ({"_x": adapters["lora"]}, "adapter name '_x'")]
    for folders_given, message in cases:
        with pytest.raises(ValueError, match=message):
            load_served(model, tok, folders_given, base_name="base", merge=True)
        assert model_fingerprint(model) == before
        assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_serve_merge_usage_errors(folders, capsys):
    from loramix.cli import main

    base, adapters = folders
    for extra in (["--adapter", f"a={adapters['lora']}", "--adapter", f"b={adapters['lora']}"],
                  ["--adapter", f"a={adapters['lora']}", "--adapter-dir", str(adapters["lora"].parent)], []):
        assert main(["serve", "--model", str(base), "--merge", "--port", "1", *extra]) == 2
        err = capsys.readouterr().err
        assert "loramix serve: error: --merge serves exactly one --adapter" in err and "Traceback" not in err


def test_serve_bench_merge_serves_one_random_lora_merged(tmp_path, capsys):
    """``loramix bench --serve --merge``: one random LoRA, merged, its requests answered alike in both modes."""
    import json

    from cli_setup import tiny_model_folder
    from loramix.cli import main

    base = tiny_model_folder(tmp_path / "base")
    path = tmp_path / "serve.json"
    assert main(["bench", "--serve", "--merge", "--model", str(base), "--clients", "1,2", "--requests", "3",
                 "--max-tokens", "3", "--threads", "1", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["models"] == ["lora"] and result["settings"]["adapters"] == {"lora": "random"}
    assert result["settings"]["merge"] is True
    assert all(r["errors"] == 0 and r["generated_tokens"] == 3 * 3 for r in result["rows"])
    assert [r["same_answers"] for r in result["rows"] if r["mode"] == "batched"] == [3, 3]
    capsys.readouterr()
    assert main(["bench", "--serve", "--merge", "--adapter", "a=x", "--adapter", "b=y"]) == 2
    assert "--merge serves one adapter merged into the base" in capsys.readouterr().err
