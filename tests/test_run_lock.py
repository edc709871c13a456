"""One process at a time trains into a run folder (``train/run_lock.py``).

Two real ``loramix train`` processes are released at the same instant into one ``output_dir``: one
trains, the other stops with exit 2 naming the folder and the owner, and the winner's folder is byte
for byte what that run writes alone. A process holding the folder also stops ``--resume``,
``--overwrite`` and the ``Trainer`` API; once it is killed (-9), the kernel has released the lock.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cli_setup import question_rows, tiny_model_folder, tree_hashes, write_config, write_jsonl
from loramix import demo
from loramix.cli import main
from loramix.train import Trainer, load_train_config
from loramix.train.run_lock import RunFolderBusy, lock_path

pytestmark = pytest.mark.usefixtures("single_thread")

# A `loramix train` process that imports everything, says "ready", and starts when told: two of them
# reach the run folder within the same millisecond instead of one interpreter start-up apart.
GATED_TRAIN = """
import sys
import loramix.cli, loramix.train.command, loramix.train.distributed
print("ready", flush=True)
sys.stdin.readline()
sys.exit(loramix.cli.main(sys.argv[1:]))
"""

# A process that holds a run folder as a training run does, until it is killed.
HOLDER = """
import sys
from loramix.train.run_lock import hold_run_folder
hold_run_folder(sys.argv[1])
print("holding", flush=True)
sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def config(folder: Path, model_dir: Path, name: str, **extra) -> Path:
    """A config in ``folder`` training into runs/a (relative: the same bytes wherever it runs)."""
    data = write_jsonl(folder / "qa.jsonl", question_rows(12))
    return write_config(folder / name, model_dir, str(data), "runs/a", **extra)


def without_timing(run: Path) -> dict:
    """Every file's sha256, but metrics.jsonl as its rows and each trainer_state.json as its value, less
    tokens_per_s (the one timing a run writes) and NumPy's global generator state (which a run does not
    seed: it is the process's own, saved so that a resume continues it)."""
    files: dict = tree_hashes(run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    files["metrics.jsonl"] = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]
    for state in run.glob("checkpoints/*/trainer_state.json"):
        value = json.loads(state.read_text())
        value["metrics"].get("train", {}).pop("tokens_per_s", None)
        value["rng"].pop("numpy", None)
        files[str(state.relative_to(run))] = value
    return files


def test_two_runs_started_together_one_trains_the_other_stops(tmp_path, model_dir, monkeypatch):
    """Before: both trained into runs/a (rows of both in metrics.jsonl, one's config beside the other's
    adapter) or one died with 'unexpected RuntimeError'."""
    work = tmp_path / "work"
    work.mkdir()
    configs = [config(tmp_path, model_dir, "fast.yaml", lr=0.005, max_steps=6, save_every=2),
               config(tmp_path, model_dir, "slow.yaml", lr=2e-4, max_steps=6, save_every=2)]
    procs = [subprocess.Popen([sys.executable, "-c", GATED_TRAIN, "train", str(c)], cwd=work, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for c in configs]
    for p in procs:
        assert p.stdout.readline() == "ready\n"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = [code for code, _, _ in outcomes]
    assert sorted(codes) == [0, 2], outcomes
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    err = outcomes[loser][2]
    assert f"runs/a is in use by another training run (pid {procs[winner].pid} on host {socket.gethostname()}" \
        in err, err
    assert "output_dir=" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    # the same config alone, in another working folder: the winner's run holds exactly its bytes
    alone = tmp_path / "alone"
    alone.mkdir()
    monkeypatch.chdir(alone)
    assert main(["train", str(configs[winner])]) == 0
    together, solo = without_timing(work / "runs" / "a"), without_timing(alone / "runs" / "a")
    assert len(together["metrics.jsonl"]) == len(solo["metrics.jsonl"])
    assert together == solo
    assert not list((work / "runs").glob(".*.lock"))  # the winner gave its lock back


def test_a_held_run_folder_stops_resume_overwrite_and_the_trainer_api(tmp_path, model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, model_dir, "cfg.yaml", max_steps=2, save_every=1)
    run = tmp_path / "runs" / "a"
    assert main(["train", str(cfg)]) == 0
    before = tree_hashes(run)
    capsys.readouterr()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, "runs/a"], cwd=tmp_path, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "holding\n"
        owner = f"runs/a is in use by another training run (pid {holder.pid} on host {socket.gethostname()}"
        for options in (["--resume", "max_steps=3"], ["--overwrite"]):
            assert main(["train", str(cfg), *options]) == 2
            err = capsys.readouterr().err
            assert owner in err and "Traceback" not in err, options
        with pytest.raises(RunFolderBusy, match=f"pid {holder.pid}"):
            Trainer(load_train_config(str(cfg), ["resume=true", "max_steps=3"])).run()
        with pytest.raises(RunFolderBusy, match="--output-dir"):  # before the demo moves the folder aside
            demo.main(["--output-dir", "runs/a"])
        assert tree_hashes(run) == before and not list(tmp_path.glob("runs/a.old-*"))  # nothing moved or written
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing anything: the kernel drops its lock
        holder.wait()
    assert main(["train", str(cfg), "--resume", "max_steps=3"]) == 0
    assert (run / "checkpoints" / "step-3").is_dir() and not lock_path(run).exists()


# Locks the file as hold_run_folder does but writes who it is only when told: the window in which a
# second process is refused before the holder has named itself.
SLOW_HOLDER = """
import fcntl, os, sys
from loramix.train.run_lock import _owner, lock_path
fd = os.open(lock_path(sys.argv[1]), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.readline()
os.pwrite(fd, _owner().encode(), 0)
print("written", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("writes_in_time", [True, False])
def test_a_process_refused_before_the_holder_names_itself_waits_for_the_name(tmp_path, monkeypatch,
                                                                            writes_in_time):
    """Before: a process refused between the holder's lock and its write said 'a process that is just
    starting' (CI saw it with two runs started together); now it waits up to OWNER_WAIT_S for the name."""
    import threading

    from loramix.train import run_lock

    folder = tmp_path / "runs" / "a"
    folder.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", SLOW_HOLDER, str(folder)], text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n"
        monkeypatch.setattr(run_lock, "OWNER_WAIT_S", 5.0 if writes_in_time else 0.2)
        if writes_in_time:
            release = threading.Timer(0.5, lambda: (holder.stdin.write("go\n"), holder.stdin.flush()))
            release.start()
        with pytest.raises(RunFolderBusy) as refused:
            run_lock.hold_run_folder(folder)
        if writes_in_time:
            release.join()
            assert f"(pid {holder.pid} on host {socket.gethostname()}" in str(refused.value)
        else:
            assert "a process that is just starting" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
