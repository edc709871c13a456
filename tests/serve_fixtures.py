"""Fixtures and helpers shared by the serving tests (``test_serve*.py``, registered from ``conftest.py`` with
``pytest_plugins``): a tiny Llama folder with one saved adapter per kind (LoRA, MixLoRA, MoRE with two tasks),
a server over them, and the reference each greedy answer is checked against (each model alone, its own
``generate``). The fixtures are module-scoped: each test module gets its own folders and server."""

from __future__ import annotations

import pytest
import torch

import loramix
from cli_setup import tiny_model_folder
from loramix.adapters import load_adapter
from loramix.adapters.more_tasks import use_task
from loramix.hub import load_model

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
CONFIGS = {
    "lora": loramix.LoraConfig(r=4, alpha=8, dropout=0.0, targets=None),
    "mix": loramix.MixLoraConfig(r=4, alpha=8, dropout=0.0, num_experts=4, top_k=2),
    "more": loramix.MoreConfig(max_rank=4, alpha=8, dropout=0.0, tasks=["x", "y"]),
}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The base model folder (tiny tokenizer with a chat template) and one saved adapter per kind."""
    root = tmp_path_factory.mktemp("serve")
    base = tiny_model_folder(root / "base")
    _, tok = load_model(str(base))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    adapters = {}
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = loramix.inject(load_model(str(base))[0], config)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # trained-looking weights: every adapter (and each MoRE task) answers differently
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        adapters[name] = loramix.save_adapter(model, root / name)
    return base, adapters


@pytest.fixture(scope="module")
def server(folders):
    """(openai client, base URL, engine) of a server running in this process."""
    import openai  # here: conftest registers this module for every test file, most of which never serve

    from loramix.serve.server.app import build_app, serve_in_thread
    from loramix.serve.server.engine import Engine, load_served

    base, adapters = folders
    model, tok = load_model(str(base))
    served = load_served(model, tok, adapters, base_name="base")
    engine = Engine(served, max_batch_size=4)
    engine.start()
    try:
        with serve_in_thread(build_app(served, engine)) as url:
            yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60), url, engine
    finally:
        engine.stop()


def own_models(base, adapters: dict, **load_options) -> tuple[dict, object]:
    """(model name → (that model alone, task or None), tokenizer), what ``alone`` reads: the base, each adapter
    on its own fresh base (``load_model(base, **load_options)``), and tasks x and y of the adapter "more"."""
    fresh = lambda: load_model(str(base), **load_options)[0].eval()  # noqa: E731
    models = {"base": (fresh(), None)}
    for name, folder in adapters.items():
        model = load_adapter(fresh(), folder).eval()
        models.update({"more:x": (model, "x"), "more:y": (model, "y")} if name == "more" else {name: (model, None)})
    return models, load_model(str(base))[1]


@pytest.fixture(scope="module")
def reference(folders):
    """model name → (model alone, task or None): the base, each adapter on its own fresh base, MoRE tasks."""
    return own_models(*folders)


def alone(reference, name: str, ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    """The greedy text of ``name``'s own model for prompt ids ``ids``."""
    models, tok = reference
    model, task = models[name]
    x = torch.tensor([ids])
    with torch.no_grad(), (use_task(model, task) if task else torch.no_grad()):
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_tokens,
                             pad_token_id=tok.pad_token_id, temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
