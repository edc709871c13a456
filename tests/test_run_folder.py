"""``loramix train`` never loses a run: no silent overwrite, --overwrite moves aside, a full disk leaves a
checkpoint to resume from (and says so), a damaged checkpoint is named, options and overrides in any order.

Each case runs the real command (``loramix.cli.main``) on a 2-layer Llama folder and a 12-question
file; the previous run's files are compared by sha256 before and after. Full disks are made at the OS
boundary: ``os.write`` failing with ENOSPC for one file (in this process), or a real file-size limit
(RLIMIT_FSIZE, in a child process) that fails torch's, safetensors' and Python's writes in the kernel.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

import loramix.train.checkpoint as ckpt
from cli_setup import question_rows, tiny_model_folder, tree_hashes, write_config, write_jsonl
from loramix.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def setup(tmp_path, model_dir, monkeypatch):
    """(config path, run folder) in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "qa.jsonl", question_rows(12))
    cfg = write_config(tmp_path / "cfg.yaml", model_dir, "qa.jsonl", "runs/a")
    return cfg, tmp_path / "runs" / "a"


def steps(run: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "train"]


def test_fresh_run_refuses_a_folder_that_holds_a_run(setup, capsys):
    cfg, run = setup
    assert main(["train", str(cfg), "max_steps=3", "save_every=1", "keep_checkpoints=5"]) == 0
    before = tree_hashes(run)
    capsys.readouterr()
    assert main(["train", str(cfg)]) == 2  # forgot --resume: nothing may change
    err = capsys.readouterr().err
    assert "runs/a already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert tree_hashes(run) == before


def test_overwrite_moves_the_old_run_aside_and_mixes_nothing(setup, capsys):
    cfg, run = setup
    assert main(["train", str(cfg), "max_steps=3", "save_every=1", "keep_checkpoints=5"]) == 0
    before = tree_hashes(run)
    assert main(["train", "--overwrite", str(cfg), "max_steps=2"]) == 0  # option before the overrides
    moved = [p for p in run.parent.iterdir() if p.name.startswith("a.old-")]
    assert len(moved) == 1 and f"to runs/{moved[0].name}" in capsys.readouterr().err
    assert tree_hashes(moved[0]) == before  # the old run, untouched, beside the new one
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-2"]  # none of the old run's
    assert steps(run) == [1, 2]


def test_options_and_overrides_in_any_order(setup, capsys):
    cfg, run = setup
    assert main(["train", str(cfg), "--print-config", "max_steps=7", "lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "lr: 0.001" in out and not run.exists()
    assert main(["train", str(cfg), "max_steps=2", "save_every=1"]) == 0
    assert main(["train", str(cfg), "--resume", "max_steps=3"]) == 0  # the README's order
    assert steps(run) == [1, 2, 3] and (run / "checkpoints" / "step-3").is_dir()


def test_output_dir_that_is_a_file(setup, capsys):
    cfg, run = setup
    run.parent.mkdir()
    run.write_text("my notes\n")
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "output_dir runs/a is a file" in err and "Traceback" not in err
    assert run.read_text() == "my notes\n"


@contextlib.contextmanager
def disk_full_when_writing(match: str):
    """Meanwhile the adapter writer of train/checkpoint.py raises ENOSPC for destinations containing ``match``."""
    real = ckpt.save_adapter

    def save_adapter(model, folder, *args, **kwargs):
        if match in str(folder):
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "adapter_model.safetensors"))
        return real(model, folder, *args, **kwargs)

    ckpt.save_adapter = save_adapter
    try:
        yield
    finally:
        ckpt.save_adapter = real


def test_full_disk_at_the_end_leaves_a_checkpoint_to_resume_from(setup, capsys):
    """save_every 0: before, a full disk while writing the final adapter lost every step; now the end of
    the run is checkpointed first, the error says so and names it, and --resume writes the adapter."""
    cfg, run = setup
    with disk_full_when_writing(".adapter.tmp-"):
        assert main(["train", str(cfg), "max_steps=3", "save_every=0"]) == 1
    err = capsys.readouterr().err
    assert ("error: disk full while writing runs/a/adapter; the last good checkpoint is runs/a/checkpoints/step-3; "
            "free space and rerun with --resume") in err
    assert "Traceback" not in err
    assert not (run / "adapter").exists() and not list(run.glob(".adapter.*"))  # no half-written folder
    assert main(["train", str(cfg), "max_steps=3", "--resume"]) == 0
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    saved = load_file(run / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all((final[k] == saved[k]).all() for k in final)
    assert steps(run) == [1, 2, 3]


def disk_full_at_os_write(monkeypatch, path_part: str, data_part: bytes = b"") -> None:
    """From now on ``os.write`` fails with ENOSPC, as a full disk does, when the file written to has
    ``path_part`` in its path and the bytes hold ``data_part``."""
    real = os.write

    def write(fd: int, data) -> int:
        if path_part in os.readlink(f"/proc/self/fd/{fd}") and data_part in bytes(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def adapter_tensors(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(run: Path, reference: Path) -> None:
    got, want = adapter_tensors(run), adapter_tensors(reference)
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in got)


@pytest.mark.parametrize("path_part, data_part, failed, last_good", [
    # torch.save of the optimizer state (before: "unexpected RuntimeError: [enforce fail at inline_container.cc]")
    (".tmp-step-2-", b"", "runs/a/checkpoints/step-2", "runs/a/checkpoints/step-1"),
    # the metrics line of step 3 (before: "out of disk space writing ...", no checkpoint named)
    ("metrics.jsonl", b'"step": 3', "runs/a/metrics.jsonl", "runs/a/checkpoints/step-2"),
])
def test_full_disk_names_the_file_and_the_last_good_checkpoint(setup, capsys, monkeypatch, path_part, data_part,
                                                                failed, last_good):
    """The error says the disk is full, what was being written and the checkpoint to resume from; nothing
    half-written is left (no checkpoint folder, no torn metrics line) and --resume ends as a run that
    never failed."""
    cfg, run = setup
    assert main(["train", str(cfg), "max_steps=4", "save_every=1", "output_dir=runs/ref"]) == 0
    with monkeypatch.context() as patch:
        disk_full_at_os_write(patch, path_part, data_part)
        assert main(["train", str(cfg), "max_steps=4", "save_every=1"]) == 1
    err = capsys.readouterr().err
    assert (f"loramix train: error: disk full while writing {failed}; the last good checkpoint is {last_good}; "
            "free space and rerun with --resume\n") in err
    assert "Traceback" not in err
    assert ckpt.latest_checkpoint(run).name == Path(last_good).name  # the failed checkpoint is not the latest
    assert not list((run / "checkpoints").glob(".tmp-*")) and not (run / "checkpoints" / "step-3").exists()
    logged = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2]  # every line whole (the failed step-3 line is cut off again)
    assert main(["train", str(cfg), "max_steps=4", "save_every=1", "--resume"]) == 0
    assert_same_adapter(run, run.parent / "ref")
    assert steps(run) == [1, 2, 3, 4]


def file_size_limit(limit: int):
    """``preexec_fn`` of a child whose files may not grow past ``limit`` bytes: the kernel fails the write
    (EFBIG, with SIGXFSZ ignored) inside whichever writer makes it, as it fails one on a full disk."""
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return preexec


@pytest.mark.parametrize("writer, file", [("safetensors", "adapter/adapter_model.safetensors"),
                                          ("torch", "optimizer.pt")])
def test_a_real_write_failure_in_a_child_process(setup, capsys, tmp_path, writer, file):
    """A resumed run whose step-3 checkpoint cannot be written: ``file`` (the first of the checkpoint at
    least that large) fails in the kernel. Before: "unexpected SafetensorError: ... (os error 27)" or
    "unexpected RuntimeError: [enforce fail at inline_container.cc:672]". Now the cause, the checkpoint
    and the last good one are named, none is half-written, and --resume afterwards is exact."""
    cfg, run = setup
    options = ["save_every=1", "schedule=constant", "keep_checkpoints=5"]
    assert main(["train", str(cfg), "max_steps=4", *options, "output_dir=runs/ref"]) == 0
    assert main(["train", str(cfg), "max_steps=2", *options]) == 0
    limit = (run / "checkpoints" / "step-2" / file).stat().st_size - 1
    written_first = [run / "metrics.jsonl", run / "train_config.yaml",
                     run / "checkpoints" / "step-2" / "adapter" / "adapter_config.json"]
    assert all(p.stat().st_size < limit / 2 for p in written_first)  # these grow a little, and stay below
    child = subprocess.run([sys.executable, "-m", "loramix", "train", str(cfg), "--resume", "max_steps=4", *options],
                           cwd=tmp_path, preexec_fn=file_size_limit(limit), capture_output=True, text=True,
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    assert child.returncode == 1, child.stderr
    assert child.stderr.endswith(
        "loramix train: error: file too large for the file-size limit (ulimit -f) or the file system while writing "
        "runs/a/checkpoints/step-3; the last good checkpoint is runs/a/checkpoints/step-2; raise the limit and "
        "rerun with --resume\n"), child.stderr
    assert "Traceback" not in child.stderr
    assert ckpt.latest_checkpoint(run).name == "step-2" and not list((run / "checkpoints").glob(".tmp-*"))
    assert not (run / "checkpoints" / "step-3").exists()
    assert main(["train", str(cfg), "--resume", "max_steps=4", *options]) == 0
    assert_same_adapter(run, run.parent / "ref")


@pytest.mark.parametrize("key, value, said", [
    ("step", "thirty", "'step' must be a whole number >= 0, found \"thirty\""),
    ("batch_in_epoch", -1, "'batch_in_epoch' must be a whole number >= 0, found -1"),
    ("rng", {"python": [3, [1, 2], None]}, "'rng' is not the generator state loramix saves"),
])
def test_a_damaged_trainer_state_is_named(setup, capsys, key, value, said):
    """Before: "step": "thirty" printed a logging traceback ("--- Logging error ---") and went on."""
    cfg, run = setup
    assert main(["train", str(cfg), "max_steps=2", "save_every=1"]) == 0
    state_file = run / "checkpoints" / "step-2" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), key: value}))
    before = tree_hashes(run)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "max_steps=3"]) == 2
    err = capsys.readouterr().err
    assert f"loramix train: error: runs/a/checkpoints/step-2/trainer_state.json: {said}" in err
    assert "Traceback" not in err and "Logging error" not in err
    assert tree_hashes(run) == before  # refused before writing anything


def two_adapter_config(folder: Path) -> Path:
    """A multi-adapter YAML in ``folder``: adapters x and y from cfg.yaml, in runs/m/x and runs/m/y."""
    multi = folder / "multi.yaml"
    multi.write_text(json.dumps({"output_dir": "runs/m", "adapters": [{"name": "x", "config": "cfg.yaml"},
                                                                        {"name": "y", "config": "cfg.yaml"}]}))
    return multi


def test_multi_adapter_run_refuses_before_touching_anything(setup, capsys, tmp_path):
    cfg, _ = setup
    multi = two_adapter_config(tmp_path)
    (tmp_path / "runs" / "m" / "y").mkdir(parents=True)
    (tmp_path / "runs" / "m" / "y" / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["train", str(multi)]) == 2
    err = capsys.readouterr().err
    assert "runs/m/y already holds a run" in err and not (tmp_path / "runs" / "m" / "x").exists()


def test_multi_adapter_overwrite_refuses_before_moving_anything(setup, capsys, tmp_path):
    """--overwrite over several run folders checks them all first: a refusal (here y's output_dir is a file)
    leaves x's old run where it was instead of moving it aside and then stopping."""
    cfg, _ = setup
    multi = two_adapter_config(tmp_path)
    old = tmp_path / "runs" / "m" / "x"
    old.mkdir(parents=True)
    (old / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "runs" / "m" / "y").write_text("my notes\n")
    assert main(["train", "--overwrite", str(multi)]) == 2
    err = capsys.readouterr().err
    assert "runs/m/y is a file" in err
    assert (old / "metrics.jsonl").read_text() == '{"step": 1}\n' and not list(old.parent.glob("x.old-*"))
