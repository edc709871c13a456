"""hub: dtype/device choice, the cached GGUF conversion (atomic), error messages, the real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from loramix import hub
from loramix.hub import ModelLoadError, load_model, resolve_device, resolve_dtype
from tiny_models import tiny_model
from tiny_tokenizer import tiny_tokenizer


def test_resolve_dtype_and_device():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16 and resolve_dtype("torch.float16") is torch.float16
    assert resolve_dtype("auto", "cpu") is torch.float32 and resolve_dtype(None, "cpu") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Make the GGUF loaders return a tiny tied-embedding Llama and a tiny tokenizer; cache in tmp_path."""
    tok = tiny_tokenizer()
    source = tiny_model("llama", vocab_size=len(tok), tie_word_embeddings=True)
    calls = []

    def model_from_pretrained(folder, gguf_file=None, dtype=None, **kw):
        calls.append(gguf_file)
        assert gguf_file == hub.GGUF_FILE
        return source

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda folder, gguf_file=None, **kw: tok)
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    return source, calls


def test_conversion_is_cached_and_faithful(fake_gguf, monkeypatch, tmp_path):
    source, calls = fake_gguf
    folder = hub.convert_embedded()
    assert folder == tmp_path / "cache" / hub.CACHE_SUBDIR and (folder / hub.MARKER).is_file()
    assert calls == [hub.GGUF_FILE]
    assert hub.convert_embedded() == folder and calls == [hub.GGUF_FILE]  # second call: cache hit
    monkeypatch.undo()  # real from_pretrained again, reading the converted folder
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    model, tok = load_model("smollm2-135m")
    assert model.config._name_or_path == "smollm2-135m" and tok.pad_token is not None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, source(input_ids=ids).logits, atol=1e-6)


def test_killed_conversion_leaves_no_cache(fake_gguf, monkeypatch, tmp_path):
    original_save = transformers.LlamaForCausalLM.save_pretrained

    def save_then_die(self, path, *a, **kw):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "save_pretrained", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        hub.convert_embedded()
    root = tmp_path / "cache"
    assert not (root / hub.CACHE_SUBDIR).exists()
    assert [p.name for p in root.iterdir() if p.is_dir()] == []  # the temporary folder is removed too
    # a stale folder without the completion marker is not trusted: the next call rebuilds it
    monkeypatch.setattr(transformers.LlamaForCausalLM, "save_pretrained", original_save)
    (root / hub.CACHE_SUBDIR).mkdir()
    (root / hub.CACHE_SUBDIR / "config.json").write_text("{}")
    assert not hub._is_complete(root / hub.CACHE_SUBDIR)
    folder = hub.convert_embedded()
    assert hub._is_complete(folder) and (folder / "model.safetensors").stat().st_size > 1000


def test_load_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))

    def offline(*a, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match=r"could not load model 'someone/model'.*offline"):
        load_model("someone/model")


def test_folder_without_tokenizer_loads_when_not_required(tmp_path):
    """The exports load a base folder without tokenizer files (require_tokenizer=False): tokenizer None."""
    folder = tmp_path / "tiny"
    tiny_model("llama", vocab_size=64).save_pretrained(folder)
    model, tok = load_model(str(folder), dtype="float32", device="cpu", require_tokenizer=False)
    assert tok is None and model.config._name_or_path == str(folder) and not model.training
    with pytest.raises((OSError, ValueError, ModelLoadError)):  # a tokenizer is required by default
        load_model(str(folder), dtype="float32", device="cpu")


def mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files of this process's memory maps that hold ``tensor``'s first element (Linux's /proc/self/maps)."""
    pointer, files = tensor.data_ptr(), set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if start <= pointer < end and len(fields) > 5:
                files.add(fields[5])
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="memory maps are read from Linux's /proc")
def test_a_cpu_model_owns_its_memory_and_keeps_its_ties(tmp_path):
    """``from_pretrained`` leaves the weights in the safetensors file's memory map; ``load_model`` copies them out
    (``own_memory``), each tied Parameter once."""
    folder = tmp_path / "tiny"
    tiny_model("llama", vocab_size=64, tie_word_embeddings=True).save_pretrained(folder)
    checkpoint = str(folder / "model.safetensors")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert any(checkpoint in mapped_files(p) for p in loaded.parameters())  # what own_memory is for
    del loaded
    model, _ = load_model(str(folder), dtype="float32", device="cpu", require_tokenizer=False)
    assert all(checkpoint not in mapped_files(t) for t in list(model.parameters()) + list(model.buffers()))
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.slow
def test_real_smollm2_conversion_matches_gguf():
    """The cached plain-Llama folder gives the same logits as the dequantised GGUF model."""
    model, tok = load_model("smollm2-135m")
    assert model.config._name_or_path == "smollm2-135m" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.pad_token_id is not None and tok.chat_template
    path = hub.gguf_path()
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                   dtype=torch.float32)
    ids = tok("Question: Which technology was developed most recently?\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, gguf_model(input_ids=ids).logits, atol=1e-4)
