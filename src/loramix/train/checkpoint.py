"""Checkpoints of a training run, written atomically and read without unpickling.

Layout of ``output_dir/checkpoints/``::

    step-200/
        adapter/              adapter_config.json + adapter_model.safetensors (loramix.save_adapter)
        optimizer.pt          AdamW state (tensors, numbers) - read with torch.load(weights_only=True)
        scheduler.pt          learning-rate scheduler and gradient-scaler state
        rng.pt                torch CPU / CUDA generator states
        trainer_state.json    step, data position (epoch, batch), Python/NumPy RNG, last metrics
    step-300/ ...
    latest                    one line: the name of the newest complete checkpoint ("step-300")

A checkpoint is first written into a hidden temporary folder and renamed into place when complete,
and ``latest`` is replaced atomically after that, so a run killed at any moment leaves either the
previous checkpoint or the new one, never half of one. A write that fails (a full disk) is reported
as a ``SaveError`` that says so, names what was being written and the last good checkpoint
(``reporting_save_failures``); the temporary folder is removed and ``latest`` keeps its old value.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from ..adapters.common import atomic_write
from ..adapters.folder import checkpoint_step, read_adapter_folder
from ..adapters.io import copy_adapter_tensors, save_adapter
from ..hub import write_folder

LATEST = "latest"
STATE_NAME = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the folder or file."""


class RunFolderError(CheckpointError):
    """A fresh run was pointed at a folder that holds another run (or at a file)."""


class SaveError(RuntimeError):
    """Writing a checkpoint or the final adapter failed (a full disk, permissions); the message says
    why and names the last good checkpoint to resume from."""


# What makes a folder a run folder (written by Trainer.setup / train / finish).
RUN_FILES = ("metrics.jsonl", "train_config.yaml", "checkpoints", "adapter")


def run_files(output_dir: str | os.PathLike) -> list[str]:
    """The entries of ``output_dir`` that a training run writes (empty: not a run folder)."""
    out = Path(output_dir)
    return [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []


def move_aside(output_dir: str | os.PathLike) -> Path:
    """Rename ``output_dir`` to ``<output_dir>.old-<UTC time>`` (``-2``, ``-3`` ... if taken); never deletes."""
    out = Path(output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = out.with_name(f"{out.name}.old-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = out.with_name(f"{out.name}.old-{stamp}-{n}")
    os.rename(out, target)
    return target


def claim_run_folder(output_dir: str | os.PathLike, *, resume: bool | str, overwrite: bool = False,
                     key: str = "output_dir", move: bool = True) -> Path | None:
    """Make sure a run may write into ``output_dir``; returns where an old run was moved, if one was.

    A fresh run (``resume`` false) into a folder that holds a run refuses unless ``overwrite``, which
    moves the old run aside (``move_aside``) so none of its files (metrics, adapter, checkpoints that a
    later resume would pick up) mixes with the new run's. ``resume`` into a folder with a finished
    adapter but no checkpoint refuses too: resuming would start again from step 0 over it. ``move``
    False only checks (so several folders can all be checked before any is moved).

    Raises:
        RunFolderError: naming the folder, what it holds, and the options (--resume, --overwrite).
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"{key} {out} is a file, not a folder: choose another {key}=")
    held = run_files(out)
    if not held:
        return None
    if resume and overwrite:
        raise RunFolderError(f"--resume continues the run in {out}, --overwrite moves it aside: give one of them")
    if resume:
        if isinstance(resume, str) or latest_checkpoint(out) is not None or "adapter" not in held:
            return None
        raise RunFolderError(f"{out} holds a finished run (adapter/) without checkpoints: there is nothing to "
                             f"resume from. Use --overwrite to move it aside and start again, or another {key}=")
    if not overwrite:
        raise RunFolderError(f"{out} already holds a run ({', '.join(held)}): add --resume to continue it, or "
                             f"--overwrite to move it aside to {out}.old-<time> and start fresh (or choose another "
                             f"{key}=)")
    return move_aside(out) if move else None


def save_final_adapter(model: torch.nn.Module, output_dir: str | os.PathLike, extra: dict[str, Any]) -> Path:
    """Write ``output_dir/adapter`` atomically as a whole folder (``hub.write_folder``)."""
    return write_folder(Path(output_dir) / "adapter", lambda tmp: save_adapter(model, tmp, extra=extra),
                         ".adapter.tmp-")


# Write failures that more free space (or a higher limit) cures, and how a message names them.
NO_SPACE = {errno.ENOSPC: ("disk full", "free space"),
            errno.EDQUOT: ("disk quota exceeded", "free space (or raise the quota)"),
            errno.EFBIG: ("file too large for the file-size limit (ulimit -f) or the file system",
                          "raise the limit")}


def write_errno(err: BaseException) -> int | None:
    """The OS error number behind a failed write, or None when ``err`` is not one: an ``OSError``'s errno, or
    the ``(os error N)`` that safetensors' Rust writer puts in its message (its ``SafetensorError`` is no
    ``OSError``). torch.save's C++ writer reports neither, which is why ``save_tensors`` does not let it
    write files."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno:
            return cause.errno
        found = re.search(r"\(os error (\d+)\)", str(cause))
        if found:
            return int(found.group(1))
        cause = cause.__cause__ or cause.__context__
    return None


def describe_save_failure(code: int, target: str | os.PathLike, last_good: Path | None) -> str:
    """The message of a ``SaveError``: what failed (a full disk said as such) while writing ``target``,
    the last good checkpoint, and what to do."""
    what, cure = NO_SPACE.get(code, (None, "fix that"))
    head = f"{what} while writing {target}" if what else f"could not write {target}: {os.strerror(code)}"
    if last_good is not None:
        return f"{head}; the last good checkpoint is {last_good}; {cure} and rerun with --resume"
    return f"{head}; no checkpoint was written before this point; {cure} and rerun with --resume (from step 0)"


@contextlib.contextmanager
def reporting_save_failures(target: str | os.PathLike, last_good: Path | None) -> Iterator[None]:
    """Turn a failed write inside the block (any writer's exception that carries an OS error number) into a
    ``SaveError`` naming ``target`` and ``last_good``; other exceptions pass unchanged.

    Example:
        >>> with reporting_save_failures(run / "adapter", last_good=run / "checkpoints" / "step-200"):
        ...     save_final_adapter(model, run, extra={})
    """
    try:
        yield
    except SaveError:
        raise
    except Exception as err:  # noqa: BLE001 - torch, safetensors and Python raise different types
        code = write_errno(err)
        if code is None:
            raise
        raise SaveError(describe_save_failure(code, target, last_good)) from err


def write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, append: bool = False) -> None:
    """Write ``data`` to ``path`` (replacing it, or at its end with ``append``) through ``os.write``, so a
    failure is an ``OSError`` with its errno and the file name; a failed append is cut back to the old
    length, so no torn line stays in a log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC), 0o644)
    try:
        start = os.fstat(fd).st_size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            if append:
                os.ftruncate(fd, start)
            raise
    except OSError as err:
        err.filename = err.filename or str(path)
        raise
    finally:
        os.close(fd)


def save_tensors(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` into memory, then ``write_bytes``: torch's own file writer turns a full disk into
    "[enforce fail at inline_container.cc] unexpected pos", which names no cause."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getbuffer())


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_states() -> tuple[dict[str, Any], dict[str, torch.Tensor | list[torch.Tensor]]]:
    """(JSON-able Python/NumPy generator states, tensor states of torch CPU/CUDA generators)."""
    version, internal, gauss = random.getstate()
    plain: dict[str, Any] = {"python": [version, list(internal), gauss]}
    if "numpy" in sys.modules:  # only if something in the process uses NumPy's global generator
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        plain["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def set_rng_states(plain: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Restore what ``rng_states`` returned."""
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in plain:
        import numpy as np

        name, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step-{step}`` atomically, point ``latest`` at it, delete all but the newest ``keep``;
    returns the checkpoint folder. ``state``: JSON-able trainer state (data position, metrics); the step and
    the RNG states are added here."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        save_adapter(model, tmp / "adapter")
        save_tensors(optimizer.state_dict(), tmp / "optimizer.pt")
        save_tensors({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}, tmp / "scheduler.pt")
        plain_rng, tensor_rng = rng_states()
        save_tensors(tensor_rng, tmp / "rng.pt")
        write_bytes(tmp / STATE_NAME, (json.dumps(dict(state, step=step, rng=plain_rng)) + "\n").encode())

    final = write_folder(root / f"step-{step}", write, f".tmp-step-{step}-")
    atomic_write(root / LATEST, lambda tmp: Path(tmp).write_text(final.name + "\n"))
    _prune(root, keep, protect=final.name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    done = sorted((p for p in root.glob("step-*") if p.is_dir() and checkpoint_step(p) >= 0), key=checkpoint_step)
    for old in done[:-keep] if keep > 0 else done:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # leftovers of a run killed while writing
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder named by ``checkpoints/latest``, or None when the run has no checkpoint yet."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    if not (folder / STATE_NAME).is_file():
        raise CheckpointError(f"{pointer} names '{folder.name}', which is not a complete checkpoint folder")
    return folder


def _load_tensors(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing from the checkpoint")
    try:
        # weights_only: only tensors and plain containers are accepted, never arbitrary objects
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the unpickler raises many kinds
        raise CheckpointError(f"{path}: not a readable checkpoint file ({err})") from None


def load_checkpoint(folder: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any) -> dict[str, Any]:
    """Load adapter weights, optimizer, scheduler and scaler state from ``folder``; return the trainer state.

    RNG states are returned in the state (``"rng"`` and ``"rng_tensors"``) for the caller to restore last.
    """
    folder = Path(folder)
    state_path = folder / STATE_NAME
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: not a checkpoint folder (no {STATE_NAME})")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_path}: not valid JSON ({err})") from None
    check_state(state, state_path)
    rng_tensors = _load_tensors(folder / "rng.pt")
    try:  # on a scratch generator: the run's own are set last, by the caller
        torch.Generator().set_state(rng_tensors["torch"])
    except (TypeError, KeyError, IndexError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'rng.pt'}: 'torch' is not a torch generator state ({err})") from None
    # through the one adapter-folder reader: a LoRA adapter is a PEFT folder (PEFT key names)
    copy_adapter_tensors(model, read_adapter_folder(folder / "adapter").tensors, str(folder / "adapter"))
    optimizer.load_state_dict(_load_tensors(folder / "optimizer.pt"))
    sched = _load_tensors(folder / "scheduler.pt")
    scheduler.load_state_dict(sched["scheduler"])
    scaler.load_state_dict(sched["scaler"])
    state["rng_tensors"] = rng_tensors
    return state


def check_state(state: Any, path: Path) -> None:
    """Check ``trainer_state.json`` as ``save_checkpoint`` writes it before anything is loaded from it: the
    data position (``step``, ``epoch``, ``batch_in_epoch``: whole numbers >= 0), ``metrics`` (an object)
    and the Python/NumPy generator states under ``rng`` (tried on scratch generators).

    Raises:
        CheckpointError: naming ``path``, the key and the value found.
    """
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(state).__name__}")
    for key in ("step", "epoch", "batch_in_epoch"):
        if key not in state:
            raise CheckpointError(f"{path}: '{key}' is missing")
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: '{key}' must be a whole number >= 0, found {json.dumps(value)}")
    if not isinstance(state.get("metrics", {}), dict):
        raise CheckpointError(f"{path}: 'metrics' must be an object, found {json.dumps(state['metrics'])}")
    rng = state.get("rng")
    try:
        version, internal, gauss = rng["python"]
        random.Random().setstate((version, tuple(internal), gauss))
        if "numpy" in rng:
            import numpy as np

            name, keys, pos, has_gauss, cached = rng["numpy"]
            np.random.RandomState().set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, KeyError, OverflowError) as err:
        raise CheckpointError(f"{path}: 'rng' is not the generator state loramix saves ({err})") from None
