"""MixLoRA's C kernel for the SiLU-gated expert rows (``modules/native_rows.py``, ``modules/native/swiglu_rows.c``).

``NativeSwiGLURows`` must give what plain autograd gives over the formula it replaces (the frozen rows gathered, each
expert's LoRA up step added, ``w · silu(g) ⊙ u`` mixed into the tokens and masked for the down LoRA): outputs and the
gradients of every input, in fp32 against an fp64 reference, whichever outputs feed the loss, with projections
without a LoRA, unrouted rows, and tokens with no, one or three rows. In the block it must equal the eager path
(``native_kernel: false``) and the per-expert loop, with dropout and padding, and it must be the path that ran; in
bf16 it must round each result once and stay within a few bf16 roundings of the eager path.
Where no kernel can be built, ``native.load`` warns once and the eager path runs.
"""

from __future__ import annotations

import subprocess

import pytest
import torch

import loramix
from conftest import mixlora_config, perturb_adapter
from test_modules import assert_same_run, first_moe, rel_err, run_with_grads, token_mask
from tiny_models import tiny_model
from loramix.modules import native, native_rows
from loramix.modules.native_rows import NativeSwiGLURows

needs_kernel = pytest.mark.skipif(native_rows.kernel() is None, reason="no C compiler on this machine")

EXPERTS, RANK = 3, 4


def _problem(seed: int, width: int = 37):
    """A dispatch of 9 tokens: token 4 has no row, token 7 three; rows sorted by expert, then 2 unrouted rows."""
    g = torch.Generator().manual_seed(seed)
    token = torch.tensor([0, 2, 7, 1, 3, 7, 8, 0, 5, 6, 7, 2, 6, 1, 3])
    sizes = [4, 3, 6, 2]  # three experts' segments, then the unrouted rows (no LoRA)
    rows, tokens = token.shape[0], 9
    tensors = {
        "gate": torch.randn(tokens, width, generator=g) * 2, "up": torch.randn(tokens, width, generator=g),
        "low_gate": torch.randn(rows, RANK, generator=g), "low_up": torch.randn(rows, RANK, generator=g),
        "B_gate": torch.randn(EXPERTS, width, RANK, generator=g) * 0.5,
        "B_up": torch.randn(EXPERTS, width, RANK, generator=g) * 0.5,
        "weight": torch.rand(rows, 1, generator=g),
    }
    keep = torch.rand(rows, width, generator=g) > 0.3
    return tensors, token, sizes, tokens, keep


def _reference(t: dict, token, sizes, tokens, keep, want_rows):
    """Plain autograd over the formula (fp64)."""
    def rows_of(frozen, low, B):
        rows = frozen.index_select(0, token)
        if low is None:
            return rows
        deltas = [low_e @ B[e].t() for e, low_e in enumerate(low.split(sizes)[:EXPERTS])]
        deltas += [low.new_zeros(n, frozen.shape[1]) for n in sizes[EXPERTS:]]
        return rows + torch.cat(deltas)

    g, u = rows_of(t["gate"], t["low_gate"], t["B_gate"]), rows_of(t["up"], t["low_up"], t["B_up"])
    y = t["weight"] * torch.nn.functional.silu(g) * u
    mixed = torch.zeros(tokens, y.shape[1], dtype=y.dtype).index_add(0, token, y)
    rows = (y if keep is None else torch.where(keep, y, 0.0)) if want_rows else None
    return mixed, rows


def _native(t: dict, token, sizes, tokens, keep, want_rows):
    row_expert = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return NativeSwiGLURows.apply(t["gate"], t["up"], token, row_expert, sizes, t["low_gate"], t["low_up"],
                                  t["B_gate"], t["B_up"], t["weight"], keep, want_rows)


@needs_kernel
@pytest.mark.parametrize("without", [None, "gate", "up"], ids=["both-lora", "no-gate-lora", "no-up-lora"])
@pytest.mark.parametrize("masked", [True, False], ids=["mask", "nomask"])
@pytest.mark.parametrize("losses", ["both", "mixed", "rows"])
@pytest.mark.parametrize("width", [37, 150, 192], ids=["narrow", "wide", "blocks-of-64"])
def test_native_rows_match_autograd(width, losses, masked, without):
    """Outputs and the gradients of every input equal fp64 autograd over the formula (fp32 precision), whether the
    loss reads both outputs or one; a token without rows gets zeros and a zero gradient. Width 150: the LoRA up step's
    64-column vector blocks and a tail; width 37: the tail alone (in each, rows 0-3 and 8-11 are one expert's block
    of 4, the others go one by one); width 192 (a multiple of 64): the LoRA gradients in C too (``_lora_grads``)."""
    tensors, token, sizes, tokens, keep = _problem(seed=1, width=width)
    keep = keep if masked else None
    if without is not None:
        tensors[f"low_{without}"] = tensors[f"B_{without}"] = None
    want_rows = losses != "mixed"
    probe = torch.randn(tokens, tensors["gate"].shape[1], generator=torch.Generator().manual_seed(2))
    results = []
    for fn, dtype in ((_reference, torch.float64), (_native, torch.float32)):
        leaves = {k: None if v is None else v.to(dtype).requires_grad_() for k, v in tensors.items()}
        mixed, rows = fn(leaves, token, sizes, tokens, keep, want_rows)
        loss = 0
        if losses in ("both", "mixed"):
            loss = loss + (mixed * probe.to(dtype)).sum()
        if losses in ("both", "rows"):
            loss = loss + rows.sin().sum()
        loss.backward()
        grads = {k: v.grad.double() for k, v in leaves.items() if v is not None}
        results.append((mixed.detach().double(), None if rows is None else rows.detach().double(), grads))
    (ref_mixed, ref_rows, ref_grads), (mixed, rows, grads) = results
    torch.testing.assert_close(mixed, ref_mixed, rtol=1e-5, atol=1e-5)
    assert mixed[4].abs().max() == 0  # token 4 has no row
    assert (rows is None) == (ref_rows is None)
    if rows is not None:
        torch.testing.assert_close(rows, ref_rows, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, want in ref_grads.items():
        assert want.abs().max() > 0, name
        assert rel_err(grads[name], want) < 1e-5, name
    assert grads["gate"][4].abs().max() == 0


@needs_kernel
def test_native_rows_in_bf16_round_each_result_once():
    """bf16 rows: outputs equal fp64 autograd over the same (bf16-rounded) inputs to bf16's rounding of one result
    (the arithmetic is fp32 inside), gradients to a few roundings (g and u are kept in bf16 for backward, as the eager
    path keeps them), and all come back in bf16."""
    tensors, token, sizes, tokens, keep = _problem(seed=3)
    bf16 = {k: v.to(torch.bfloat16) for k, v in tensors.items()}
    probe = torch.randn(tokens, tensors["gate"].shape[1], generator=torch.Generator().manual_seed(4))
    results = []
    for fn, leaves in ((_reference, {k: v.double().requires_grad_() for k, v in bf16.items()}),
                       (_native, {k: v.clone().requires_grad_() for k, v in bf16.items()})):
        mixed, rows = fn(leaves, token, sizes, tokens, keep, True)
        ((mixed * probe.to(mixed.dtype)).sum() + rows.sin().sum()).backward()
        results.append((mixed, rows, leaves))
    (ref_mixed, ref_rows, ref_leaves), (mixed, rows, leaves) = results
    assert mixed.dtype == rows.dtype == torch.bfloat16
    assert rel_err(mixed.double(), ref_mixed.detach()) < 1e-2
    assert rel_err(rows.double(), ref_rows.detach()) < 1e-2
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == torch.bfloat16, name
        assert rel_err(leaf.grad.double(), ref_leaves[name].grad) < 3e-2, name


@needs_kernel
def test_native_silu_over_fp32s_range_and_nan():
    """One row per token, weight 1, up 1: the mix is silu(g), within 1e-6 relative of torch's over [-100, 100] (the
    exp polynomial and its clamps), 0 and ±inf-free at the ends, and a NaN stays NaN (a NaN loss is still seen)."""
    width = 4001
    gate = torch.linspace(-100, 100, width).reshape(1, width)
    gate = torch.cat([gate, torch.full((1, width), float("nan"))])
    token, ones = torch.tensor([0, 1]), torch.ones(2, 1)
    mixed, _ = NativeSwiGLURows.apply(gate, torch.ones(2, width), token, torch.tensor([0, 0]), [2], None, None, None,
                                      None, ones, None, False)
    want = torch.nn.functional.silu(gate[0].double())
    got = mixed[0].double()
    assert torch.isfinite(got).all()
    assert ((got - want).abs() <= 1e-6 * want.abs() + 1e-30).all()
    assert torch.isnan(mixed[1]).all()


def _block(native_kernel: bool, ffn_targets: list[str], dropout: float, width: int | None = None):
    cfg = mixlora_config(attention_targets=[], ffn_targets=ffn_targets, dropout=dropout, native_kernel=native_kernel)
    moe, _ = first_moe(loramix.inject(tiny_model("llama", width=width), cfg))
    perturb_adapter(moe, seed=5, b_std=0.3, router_std=1.0)
    moe.train()
    return moe


@needs_kernel
@pytest.mark.parametrize("width", [None, 64], ids=["ffn-48", "ffn-128"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("ffn_targets",
                         [["gate_proj", "up_proj", "down_proj"], ["up_proj"], ["gate_proj", "down_proj"]],
                         ids=["all", "up", "gate-down"])
def test_block_native_equals_eager_and_naive(ffn_targets, dropout, width, monkeypatch):
    """In the block (padding: unrouted rows; top-2), the kernel's output and the gradients of x and every adapter
    tensor equal the eager path's (same seed: the same dropout masks) and, without dropout, the per-expert loop's,
    to 1e-5; the kernels ran (forward and backward; where the FFN width is a multiple of 64 the LoRA gradients and the
    A sides too), the eager path ran none."""
    batch, length = 3, 10
    calls = []
    real = native_rows.kernel

    class Counting:
        def __init__(self, library):
            self.library = library

        def __getattr__(self, name):
            calls.append(name)
            return getattr(self.library, name)

    monkeypatch.setattr(native_rows, "kernel", lambda: None if real() is None else Counting(real()))
    results = {}
    for name, native_kernel, dispatch in (("eager", False, "sorted"), ("native", True, "sorted"),
                                          ("naive", False, "naive")):
        moe = _block(native_kernel, ffn_targets, dropout, width)
        moe.dispatch = dispatch
        dim = moe.router.weight.shape[1]
        moe.context.token_mask = token_mask(batch, length, padded=True)
        x = torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(2))
        before = len(calls)
        torch.manual_seed(11)
        results[name] = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim))
        ran = set(calls[before:]) - {"swiglu_rows_openmp"}  # the build check, asked on every forward
        kernels = {"swiglu_gathered_rows", "swiglu_rows_forward", "swiglu_rows_backward"}
        if width:  # the LoRA gradients, and the A sides (the rows' lows, the gradients of A and of the rows)
            kernels |= {"swiglu_lora_grads", "swiglu_lora_rows"}
        assert ran == (kernels if name == "native" else set()), name
    assert_same_run(results["native"], results["eager"])
    out, grads = results["native"]
    if dropout == 0:
        naive, naive_grads = results["naive"]
        assert rel_err(out, naive) < 1e-5
        for name, want in naive_grads.items():
            assert rel_err(grads[name], want) < 1e-5, name


@needs_kernel
@pytest.mark.parametrize("precision", ["bf16-base", "bf16-autocast"])
def test_block_native_in_bf16_is_close_to_eager(precision):
    """In bf16 (a bf16 base, or fp32 under bf16 autocast) the block runs the kernel and its output and gradients are
    within bf16 rounding of the eager path's (which rounds after every operation)."""
    results = {}
    for native_kernel in (False, True):
        cfg = mixlora_config(attention_targets=[], native_kernel=native_kernel)
        base = tiny_model("llama")
        moe, _ = first_moe(loramix.inject(base.to(torch.bfloat16) if precision == "bf16-base" else base, cfg))
        perturb_adapter(moe, seed=5, b_std=0.3, router_std=1.0)
        moe.train()
        dim = moe.router.weight.shape[1]
        x = torch.randn(3, 10, dim, generator=torch.Generator().manual_seed(2))
        x = x.to(torch.bfloat16) if precision == "bf16-base" else x
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            assert native_rows.applies(moe, x, torch.bfloat16) == native_kernel
            results[native_kernel] = run_with_grads(moe, x, lambda t: moe(t).reshape(-1, dim).float())
    (ref, ref_grads), (out, grads) = results[False], results[True]
    assert rel_err(out, ref) < 3e-2
    for name, want in ref_grads.items():
        assert want.abs().max() > 0, name
        assert rel_err(grads[name].float(), want.float()) < 3e-2, name


@needs_kernel
def test_a_kernel_built_without_openmp_runs_only_where_torch_has_one_thread(monkeypatch):
    """Built without OpenMP the kernels run on one thread: the block then takes the eager path (torch's threads)
    unless torch itself runs on one; built with it (this machine's build), the kernels run."""
    moe = _block(True, ["gate_proj", "up_proj", "down_proj"], 0.0)
    x = torch.zeros(1, 2, moe.router.weight.shape[1])
    real = native_rows.kernel()
    assert real.swiglu_rows_openmp() == 1 and native_rows.applies(moe, x, torch.float32)

    class WithoutOpenMP:
        def __getattr__(self, name):
            return (lambda: 0) if name == "swiglu_rows_openmp" else getattr(real, name)

    monkeypatch.setattr(native_rows, "kernel", WithoutOpenMP)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not native_rows.applies(moe, x, torch.float32)
        torch.set_num_threads(1)
        assert native_rows.applies(moe, x, torch.float32)
    finally:
        torch.set_num_threads(threads)


def test_native_kernel_must_be_true_or_false():
    with pytest.raises(ValueError, match="native_kernel"):
        mixlora_config(native_kernel="yes")


def test_no_compiler_warns_once_and_the_eager_path_runs(tmp_path, monkeypatch):
    """With no usable compiler (a fresh cache), ``load`` returns None and warns once naming the kernel and how to turn
    the attempt off; the block then runs eager and gives the eager path's output."""
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.warns(UserWarning, match=r"'swiglu_rows' is not used \(no C compiler found.*LORAMIX_NATIVE=0"):
        assert native_rows.kernel() is None
    moe = _block(True, ["gate_proj", "up_proj", "down_proj"], 0.0)
    dim = moe.router.weight.shape[1]
    x = torch.randn(2, 6, dim, generator=torch.Generator().manual_seed(3))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning
        out = moe(x)
    monkeypatch.undo()
    eager = _block(False, ["gate_proj", "up_proj", "down_proj"], 0.0)
    assert torch.equal(out, eager(x))


@needs_kernel
def test_compile_error_is_reported_with_the_compilers_message(tmp_path, monkeypatch):
    """A source the compiler rejects: the warning quotes the compiler's error and names the file."""
    (tmp_path / "broken.c").write_text("int broken( {\n")
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.warns(UserWarning, match=r"broken\.c.*error"):
        assert native.load("broken") is None


@needs_kernel
def test_a_library_without_a_named_function_is_refused_with_a_warning(tmp_path, monkeypatch):
    """``load(name, signatures)``: a library that lacks a function the signatures name is not used (one warning naming
    the kernel and the function); one that has them all gets their argument and return types."""
    import ctypes

    (tmp_path / "partial.c").write_text("int present(int x) { return x + 1; }\n")
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_LOADED", {})
    with pytest.warns(UserWarning, match=r"'partial' is not used.*absent"):
        assert native.load("partial", {"present": ([ctypes.c_int], ctypes.c_int), "absent": ([], None)}) is None
    monkeypatch.setattr(native, "_LOADED", {})
    library = native.load("partial", {"present": ([ctypes.c_int], ctypes.c_int)})
    assert library is not None and library.present(41) == 42 and library.present.argtypes == [ctypes.c_int]


@needs_kernel
def test_a_built_kernel_is_reused_and_a_changed_source_is_rebuilt(tmp_path, monkeypatch):
    """The library is built once per machine: a second process (a fresh ``_LOADED``) finds it in the cache and only
    asks the compiler its version; a changed source gets a library of its own."""
    source = native.SOURCES / "swiglu_rows.c"
    monkeypatch.setattr(native, "SOURCES", tmp_path / "sources")
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / "swiglu_rows.c").write_text(source.read_text())
    monkeypatch.setenv("LORAMIX_CACHE", str(tmp_path / "cache"))
    real_run, calls = subprocess.run, []

    def recording_run(command, *args, **kwargs):
        calls.append(command)
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording_run)
    first = native._build("swiglu_rows")
    assert any("-shared" in c for c in calls)
    calls.clear()
    assert native._build("swiglu_rows") == first
    assert calls and all(c[1:] == ["--version"] for c in calls)
    (tmp_path / "sources" / "swiglu_rows.c").write_text(source.read_text() + "\n/* changed */\n")
    second = native._build("swiglu_rows")
    assert second != first and first.exists() and second.exists()


def test_native_off_by_environment(monkeypatch):
    """``LORAMIX_NATIVE=0``: no kernel, no warning, no compiler run."""
    monkeypatch.setenv("LORAMIX_NATIVE", "0")
    monkeypatch.setattr(native, "_LOADED", {})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the compiler ran"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.load("swiglu_rows") is None


@needs_kernel
@pytest.mark.parametrize("want", ["all", "rows-only", "factors-only"])
def test_native_down_lora_matches_autograd(want):
    """``native_down_lora``: ``(A_e rows_i) B_eᵀ`` per expert segment (zero for the unrouted rows past the experts),
    and the gradients of the rows, A and B equal fp64 autograd over that formula (fp32 precision), whichever inputs
    want one; blocks of four rows of one expert and rows one at a time both occur (segments of 4, 3, 6, then 2
    unrouted)."""
    from loramix.modules.native_rows import native_down_lora

    g = torch.Generator().manual_seed(9)
    sizes, width, rank, out = [4, 3, 6, 2], 128, 4, 24
    rows_n = sum(sizes)
    row_expert = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    leaves = {"rows": torch.randn(rows_n, width, generator=g), "A": torch.randn(EXPERTS, rank, width, generator=g),
              "B": torch.randn(EXPERTS, out, rank, generator=g)}
    grads_of = {"all": ("rows", "A", "B"), "rows-only": ("rows",), "factors-only": ("A", "B")}[want]
    probe = torch.randn(rows_n, out, generator=g)
    results = []
    for dtype in (torch.float64, torch.float32):
        t = {k: v.to(dtype).requires_grad_(k in grads_of) for k, v in leaves.items()}
        if dtype == torch.float64:
            pieces = [(r_e @ t["A"][e].t()) @ t["B"][e].t() for e, r_e in enumerate(t["rows"].split(sizes)[:EXPERTS])]
            delta = torch.cat(pieces + [t["rows"].new_zeros(sizes[-1], out)])
        else:
            delta = native_down_lora(t["rows"], t["A"], t["B"], row_expert, sizes)
        (delta * probe.to(dtype)).sum().backward()
        results.append((delta.detach().double(), {k: t[k].grad.double() for k in grads_of}))
    (ref, ref_grads), (got, grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert got[-2:].abs().max() == 0
    for name in grads_of:
        assert ref_grads[name].abs().max() > 0, name
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name
    if "rows" in grads_of:
        assert grads["rows"][-2:].abs().max() == 0  # unrouted rows: no LoRA, no gradient
