"""``loramix train`` never loses a run: no silent overwrite, --overwrite moves aside, a full disk leaves a
checkpoint to resume from, options and overrides in any order.

Each case runs the real command (``loramix.cli.main``) on a 2-layer Llama folder and a 12-question
file; the previous run's files are compared by sha256 before and after.
"""

from __future__ import annotations

import contextlib
import errno
import json
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
    assert "out of disk space" in err and "runs/a/checkpoints/step-3" in err and "--resume" in err
    assert "Traceback" not in err
    assert not (run / "adapter").exists() and not list(run.glob(".adapter.*"))  # no half-written folder
    assert main(["train", str(cfg), "max_steps=3", "--resume"]) == 0
    final = load_file(run / "adapter" / "adapter_model.safetensors")
    saved = load_file(run / "checkpoints" / "step-3" / "adapter" / "adapter_model.safetensors")
    assert final.keys() == saved.keys() and all((final[k] == saved[k]).all() for k in final)
    assert steps(run) == [1, 2, 3]


def test_full_disk_during_a_checkpoint_names_the_last_good_one(setup, capsys):
    cfg, run = setup
    with disk_full_when_writing(".tmp-step-2-"):
        assert main(["train", str(cfg), "max_steps=3", "save_every=1"]) == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint step-2" in err and "out of disk space" in err
    assert "the last good checkpoint is runs/a/checkpoints/step-1" in err and "Traceback" not in err
    assert ckpt.latest_checkpoint(run).name == "step-1" and not list((run / "checkpoints").glob(".tmp-*"))


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
