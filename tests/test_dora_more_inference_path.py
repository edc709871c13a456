"""The inference paths of DoRA (``LoraLinear.dora_inference_output``) and MoRE (``MoreLinear.inference_output``):
in a frozen forward (no grad, no active dropout, no autocast, unquantized base) bit for bit the general path's
numbers, actually taken there, not taken where the general path decides something, and following every write to
the adapter's tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loramix
from loramix.models.inject import more_modules
from loramix.models.many import inject_many
from loramix.modules.auxiliary import AuxiliaryLosses
from loramix.modules.lora import LoraLinear
from loramix.modules.more import MoreLinear, task_contrastive_loss
from conftest import perturb_adapter
from tiny_models import batch, tiny_model

pytestmark = pytest.mark.usefixtures("single_thread", "torch_frozen_linear")

# SmolLM2-135M's projection shapes (in, out): q/o, k/v, gate/up, down.
SMOLLM2_SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
TASKS = ["arc-e", "boolq", "piqa"]
FP32 = {"atol": 1e-5, "rtol": 1e-5}  # an fp32 result against a float64 reference


def spy(monkeypatch, cls: type, name: str) -> list[int]:
    """Counts the calls of ``cls.name`` (the real method still runs)."""
    calls = [0]
    real = getattr(cls, name)

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, counting)
    return calls


@pytest.fixture
def dora_calls(monkeypatch) -> list[int]:
    return spy(monkeypatch, LoraLinear, "dora_inference_output")


@pytest.fixture
def more_calls(monkeypatch) -> list[int]:
    return spy(monkeypatch, MoreLinear, "inference_output")


def general(module: nn.Module, *args, **kwargs):
    """The general path's output: the same call with gradients enabled (the inference paths need them off)."""
    with torch.enable_grad():
        out = module(*args, **kwargs)
    return out.detach() if isinstance(out, torch.Tensor) else out


def frozen(module: nn.Module, *args, **kwargs):
    with torch.no_grad():
        return module(*args, **kwargs)


# ================================================================================================ DoRA
def dora_layer(n_in: int, n_out: int, r: int, alpha: float, dtype: torch.dtype = torch.float32, *, bias: bool = False,
               seed: int = 0, dropout: float = 0.0) -> LoraLinear:
    """A DoRA ``LoraLinear`` over a random ``dtype`` base, B and m off their fresh values, in eval mode."""
    torch.manual_seed(seed)
    config = loramix.LoraConfig(r=r, alpha=alpha, dropout=dropout, use_dora=True)
    layer = LoraLinear(nn.Linear(n_in, n_out, bias=bias).to(dtype), config).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
        layer.lora_magnitude.mul_(1 + 0.2 * torch.randn(n_out))
    return layer


def dora_reference(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """``m ⊙ (W x + s B A x) / ||W + s B A||_row + b`` in float64, the norm from the dense merged weight."""
    W, A, B, m = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B, layer.lora_magnitude))
    merged = W + layer.scale * B @ A
    out = (x.double() @ merged.t()) * (m / merged.norm(dim=1))
    return out if layer.bias is None else out + layer.bias.detach().double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r,alpha", [(8, 16), (8, 12), (8, 8)])  # scales 2 (folded into A), 1.5 (a multiply), 1
def test_dora_path_equals_general_path(dtype, r, alpha, dora_calls):
    for i, (n_in, n_out) in enumerate(SMOLLM2_SHAPES):
        layer = dora_layer(n_in, n_out, r, alpha, dtype, bias=i % 2 == 1, seed=i)
        for rows in (1, 4):
            x = torch.randn(rows, 1, n_in).to(dtype)
            strided = torch.randn(1, n_in, rows).to(dtype).transpose(1, 2)  # (1, rows, in), not contiguous
            before = dora_calls[0]
            got, got_2d, got_1d, got_strided = (frozen(layer, t) for t in (x, x[:, 0], x[0, 0], strided))
            assert dora_calls[0] == before + 4, "the DoRA inference path was not taken"
            assert got.dtype == dtype and got.shape == (rows, 1, n_out)
            for g, t in ((got, x), (got_2d, x[:, 0]), (got_1d, x[0, 0]), (got_strided, strided)):
                assert torch.equal(g, general(layer, t)), (dtype, n_in, n_out, r, alpha, rows, t.shape)
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(got.double(), dora_reference(layer, x), atol=tol, rtol=tol)


@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("llama", torch.bfloat16), ("qwen2", torch.float32),
                                          ("gpt2", torch.float32)])  # qwen2: q/k/v biases; gpt2: Conv1D (in, out)
def test_dora_tiny_model_logits_equal_general_path(family, dtype, dora_calls):
    targets = ["c_attn", "c_fc", "c_proj"] if family == "gpt2" else None
    model = loramix.inject(tiny_model(family, dtype=dtype),
                           loramix.LoraConfig(r=4, alpha=8, dropout=0.05, use_dora=True, targets=targets))
    perturb_adapter(model)
    model.eval()
    ids, mask, _ = batch()
    expected = general(model, input_ids=ids, attention_mask=mask).logits
    assert dora_calls[0] == 0
    got = frozen(model, input_ids=ids, attention_mask=mask).logits
    assert dora_calls[0] == len([m for m in model.modules() if isinstance(m, LoraLinear)])
    with torch.inference_mode():
        in_inference_mode = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected) and torch.equal(in_inference_mode, expected)


@pytest.mark.parametrize("kind", ["dora", "more"])
def test_several_adapters_share_the_frozen_output(kind, dora_calls, more_calls):
    """``AdapterStack``'s shared frozen output (several adapters in one batch, qwen2: with biases) calls
    ``adapter_forward``: the path there does not write into that shared output, and gives the same numbers."""
    first = (loramix.LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=True) if kind == "dora"
             else loramix.MoreConfig(tasks=TASKS, max_rank=4, alpha=8, dropout=0.0))
    model = inject_many(tiny_model("qwen2"), {"a": first, "b": loramix.LoraConfig(r=2, alpha=3, use_dora=True)})
    perturb_adapter(model, b_std=0.2)
    model.eval()
    ids, mask, _ = batch(size=4)
    call = dict(input_ids=ids, attention_mask=mask, adapter_rows=[("a", 2), ("b", 2)])
    if kind == "more":
        call["task_ids"] = torch.tensor([2, 1, 0, 0])
    expected = general(model, **call).logits
    got = frozen(model, **call).logits
    assert dora_calls[0] > 0 and (kind == "dora" or more_calls[0] > 0) and torch.equal(got, expected)


def assert_writes_are_seen(layer: nn.Module, x: torch.Tensor, writes: list, reference, calls: list[int]) -> None:
    """After each of ``writes`` (in-place edits, loads) the inference path gives the general path's new output, close
    to ``reference()``, and a different one than before the write; the path was taken every time."""
    previous = frozen(layer, x)
    for write in writes:
        with torch.no_grad():
            write()
        got = frozen(layer, x)
        assert torch.equal(got, general(layer, x)) and not torch.equal(got, previous)
        torch.testing.assert_close(got.double(), reference(), **FP32)
        previous = got
    assert calls[0] == len(writes) + 1


def test_dora_general_path_where_it_decides(dora_calls):
    """Gradients, active dropout and autocast keep the general path (and its numbers)."""
    x = torch.randn(3, 5, 32)

    def taken(layer: LoraLinear, context=torch.no_grad) -> bool:
        before = dora_calls[0]
        with context():
            out = layer(x)
        assert torch.equal(out.detach(), general(layer, x)) or torch.is_autocast_enabled("cpu") or layer.training
        return dora_calls[0] > before

    layer = dora_layer(32, 16, 4, 8, bias=True, dropout=0.1)
    assert taken(layer) and not taken(layer, torch.enable_grad)
    layer.train()
    assert not taken(layer)  # training mode: the dropout mask is drawn
    plain = dora_layer(32, 16, 4, 8)
    plain.train()
    assert taken(plain)  # training mode without dropout changes nothing
    plain.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = dora_calls[0]
        plain(x)
        assert dora_calls[0] == before


def test_dora_writes_after_a_forward_are_seen(dora_calls):
    """The kept factors follow an in-place write to A, B, m, the weight and the bias, and a load."""
    layer = dora_layer(32, 16, 4, 8, bias=True)
    x = torch.randn(2, 3, 32)
    writes = [lambda: layer.lora_A.add_(0.1), lambda: layer.lora_B.mul_(2.0), lambda: layer.lora_magnitude.add_(0.5),
              lambda: layer.weight.mul_(0.5), lambda: layer.bias.add_(1.0),
              lambda: layer.load_state_dict({"lora_B": torch.randn(16, 4)}, strict=False)]
    assert_writes_are_seen(layer, x, writes, lambda: dora_reference(layer, x), dora_calls)


# ================================================================================================ MoRE
def set_ranks(module: MoreLinear, per_task: list[int]) -> None:
    """Make the selector pick ``per_task[t]`` for task t (one-hot task embeddings, a gate with a clear winner)."""
    ranks = module.ranks
    with torch.no_grad():
        module.selector.task_embedding.zero_()
        module.selector.gate.weight.zero_()
        module.selector.gate.bias.zero_()
        for t, k in enumerate(per_task):
            module.selector.task_embedding[t, t] = 1.0
            module.selector.gate.weight[ranks.index(k), t] = 8.0


def more_layer(n_in: int, n_out: int, dtype: torch.dtype = torch.float32, *, bias: bool = False, seed: int = 0,
               dropout: float = 0.0, ranks: tuple[int, ...] = (2, 8, 5), **overrides) -> MoreLinear:
    """A MoRE ``MoreLinear`` (max rank 8, three tasks choosing ``ranks``) over a random ``dtype`` base, in eval mode."""
    torch.manual_seed(seed)
    config = loramix.MoreConfig(tasks=TASKS, max_rank=8, alpha=12, dropout=dropout, **overrides)
    layer = MoreLinear(nn.Linear(n_in, n_out, bias=bias).to(dtype), config).eval()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    set_ranks(layer, list(ranks))
    return layer


def more_reference(layer: MoreLinear, x: torch.Tensor, task_ids: list[int], ranks: list[int]) -> torch.Tensor:
    """``W x + b + s Σ_{i<k_t} c_i² B[:, i] (A[i] · x)`` per sample, float64."""
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    c2 = ((torch.arange(1, 9, dtype=torch.float64) / 8) ** 2)
    out = x.double() @ W.t()
    for b, t in enumerate(task_ids):
        k = ranks[t]
        out[b] += layer.scale * ((x[b].double() @ A[:k].t()) * c2[:k]) @ B[:, :k].t()
    return out if layer.bias is None else out + layer.bias.detach().double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_path_equals_general_path_with_several_tasks(dtype, more_calls):
    for i, (n_in, n_out) in enumerate(SMOLLM2_SHAPES):
        layer = more_layer(n_in, n_out, dtype, bias=i % 2 == 1, seed=i)
        task_ids = [2, 0, 1, 0]
        layer.context.task_ids = torch.tensor(task_ids)
        for inference_only in (False, True):
            layer.context.inference_only = inference_only
            layer.context.losses = AuxiliaryLosses()  # a fresh collector, of a module called on its own
            x = torch.randn(4, 3, n_in).to(dtype)
            strided = torch.randn(4, n_in, 3).to(dtype).transpose(1, 2)  # not contiguous
            before = more_calls[0]
            got, got_2d, got_strided = (frozen(layer, t) for t in (x, x[:, 0], strided))
            assert more_calls[0] == before + 3, "the MoRE inference path was not taken"
            loss = layer.context.losses.recorded(layer).get("contrastive_loss")
            assert (loss is None) == inference_only
            for g, t in ((got, x), (got_2d, x[:, 0]), (got_strided, strided)):
                assert torch.equal(g, general(layer, t)), (dtype, n_in, n_out, inference_only, t.shape)
            if loss is not None:  # what the general path records, also recorded on the inference path
                frozen(layer, strided)
                assert torch.equal(layer.context.losses.recorded(layer)["contrastive_loss"],
                                   task_contrastive_loss(strided, torch.tensor(task_ids),
                                                         layer.selector.task_embedding.detach(), 0.05))
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            torch.testing.assert_close(got.double(), more_reference(layer, x, task_ids, [2, 8, 5]), atol=tol, rtol=tol)


@pytest.mark.parametrize("inference_only", [False, True])
def test_more_default_task_and_fixed_ranks(inference_only, more_calls):
    """Without task ids: the config's default task, then ``use_task``'s; with ranks fixed (``fix_ranks``) and then
    with the selector moved afterwards (the fixed ranks stay until ``train()``)."""
    layer = more_layer(48, 40, bias=True, default_task="boolq")
    layer.context.inference_only = inference_only
    x = torch.randn(3, 2, 48)
    assert torch.equal(frozen(layer, x), general(layer, x))
    torch.testing.assert_close(frozen(layer, x).double(), more_reference(layer, x, [1, 1, 1], [2, 8, 5]), **FP32)
    layer.context.default_task_id = 2
    assert torch.equal(frozen(layer, x), general(layer, x))
    torch.testing.assert_close(frozen(layer, x).double(), more_reference(layer, x, [2, 2, 2], [2, 8, 5]), **FP32)
    assert layer.fix_ranks() == [2, 8, 5]
    set_ranks(layer, [8, 8, 1])  # ignored in eval while the ranks are fixed
    fixed = frozen(layer, x)
    assert torch.equal(fixed, general(layer, x))
    torch.testing.assert_close(fixed.double(), more_reference(layer, x, [2, 2, 2], [2, 8, 5]), **FP32)
    layer.train().eval()  # train() clears the fixed ranks: the selector's choice again
    torch.testing.assert_close(frozen(layer, x).double(), more_reference(layer, x, [2, 2, 2], [8, 8, 1]), **FP32)
    assert torch.equal(frozen(layer, x), general(layer, x))
    assert more_calls[0] == 7


def test_more_without_a_task_is_the_general_paths_error(more_calls):
    layer = more_layer(16, 8)
    with pytest.raises(ValueError, match="needs the task of every sample"):
        frozen(layer, torch.randn(2, 16))
    layer.context.inference_only = True
    with pytest.raises(ValueError, match="needs the task of every sample"):
        frozen(layer, torch.randn(2, 16))
    layer.context.task_ids = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        frozen(layer, torch.randn(2, 16))


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D (in, out)
def test_more_tiny_model_logits_equal_general_path(family, more_calls):
    targets = ["c_attn", "c_fc", "c_proj"] if family == "gpt2" else None
    model = loramix.inject(tiny_model(family), loramix.MoreConfig(tasks=TASKS, max_rank=4, alpha=8, dropout=0.05,
                                                                  targets=targets))
    perturb_adapter(model, b_std=0.2)
    for n, m in enumerate(more_modules(model).values()):
        set_ranks(m, [[1, 4, 2], [3, 1, 4], [4, 2, 1]][n % 3])
    model.eval()
    ids, mask, _ = batch()
    task_ids = torch.tensor([2, 0, 1])
    expected = general(model, input_ids=ids, attention_mask=mask, task_ids=task_ids)
    got = frozen(model, input_ids=ids, attention_mask=mask, task_ids=task_ids)
    assert more_calls[0] == len(more_modules(model))
    assert torch.equal(got.logits, expected.logits)
    assert torch.equal(got.contrastive_loss, expected.contrastive_loss.detach())


def test_more_general_path_where_it_decides(more_calls):
    """Gradients, active dropout and autocast keep the general path."""
    x = torch.randn(3, 5, 32)
    layer = more_layer(32, 16, dropout=0.1, default_task="arc-e")

    def taken(context=torch.no_grad) -> bool:
        before = more_calls[0]
        with context():
            layer(x)
        return more_calls[0] > before

    assert taken() and not taken(torch.enable_grad)
    layer.train()
    assert not taken()  # training mode: the dropout mask is drawn
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = more_calls[0]
        layer(x)
        assert more_calls[0] == before
    plain = more_layer(32, 16, default_task="arc-e").train()
    x_one = torch.randn(2, 32)
    out = frozen(plain, x_one)
    assert more_calls[0] == before + 1 and torch.equal(out, general(plain, x_one))  # no dropout: taken in training


def test_more_writes_after_a_forward_are_seen(more_calls):
    """The kept factors and coefficients follow an in-place write to A, B and the selector, and a load."""
    layer = more_layer(32, 16, bias=True)
    layer.context.task_ids = torch.tensor([0, 1, 2])
    x = torch.randn(3, 2, 32)
    ranks = [2, 8, 5]

    def new_ranks() -> None:
        ranks[:] = [5, 2, 8]
        set_ranks(layer, ranks)

    writes = [lambda: layer.lora_A.add_(0.1), lambda: layer.lora_B.mul_(2.0), new_ranks,
              lambda: layer.load_state_dict({"lora_B": torch.randn(16, 8)}, strict=False)]
    assert_writes_are_seen(layer, x, writes, lambda: more_reference(layer, x, [0, 1, 2], ranks), more_calls)
