"""The one reader of an adapter folder: config + tensors, with every check, for every caller.

``load_adapter``, ``load_many`` (through it), the training checkpoints and the exports all read an
adapter folder here, so a folder that one of them refuses is refused by all of them with the same
message. Five layouts are read::

    loramix LoRA/DoRA/rsLoRA   adapter_config.json          PEFT's LoraConfig ("peft_type": "LORA")
    (format_version 2)         adapter_model.safetensors    PEFT keys: base_model.model.<path>.lora_A.weight
                               loramix_config.json          loramix's own settings (kind, config, extra, ...)
    loramix MixLoRA / MoRE     adapter_config.json          loramix's settings + a "peft_type" that makes
    (format_version 2)                                      PEFT-aware tools stop with a message (see below)
                               adapter_model.safetensors    loramix keys: <path>.experts.lora_A.gate_proj ...
    loramix, format_version 1  adapter_config.json          loramix's settings (no peft_type)
                               adapter_model.safetensors    loramix keys
    the MixLoRA authors'       adapter_config.json          "peft_type": "MIXLORA"  (see authors.py)
                               adapter_model.bin            read with torch.load(weights_only=True)
    MoE-PEFT LoRAMoE / MoLA    adapter_config.json          "peft_type": "LORAMOE" / "MOLA" (see moe_peft.py)
                               adapter_model.bin            read with torch.load(weights_only=True)

A PEFT LoRA folder written by another tool (no ``loramix_config.json``) is read too when loramix's
``LoraConfig`` can express it (one rank and alpha for all modules).

Checks, each failing with ``AdapterLoadError`` naming the folder, file and key and saying what to do:
a run folder given instead of its ``adapter/``; a missing, non-UTF-8 or invalid JSON config; a
missing, truncated or damaged weights file; config values that do not fit the tensors (every
tensor's rank, expert and task dimension against the config; in/out features consistent between
the tensors of one module); and, given a model, its shapes against the adapter's (a base of another
shape fails with one message naming both bases). A base of the same shape but another name than the
one recorded loads with a warning naming both.

Why the MixLoRA/MoRE ``peft_type`` values read like sentences: PEFT (0.21) and lm-eval's ``peft=``
look the value up in PEFT's table of adapter types, and an unknown one ends in
``KeyError: '<the value>'``; the value is the message the user sees.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..config import ConfigError, LoraConfig, adapter_config_from_dict, is_int, is_number
from ..models.registry import FAMILIES, ModelFamily, family_of
from ..modules import AdapterKind, kind_of, registered_kinds
from ..modules.kinds import TensorRole, layer_sites
from ..modules.quantized import logical_shape
from .authors import is_authors_format, read_authors_folder
from .common import (
    CONFIG_NAME, FORMAT, FORMAT_VERSION, PEFT_NAMES, PEFT_PREFIX, SIDECAR_NAME, WEIGHTS_NAME, AdapterLoadError,
    base_model_name, key_mismatch,
)
from .moe_peft import is_moe_peft_format, moe_peft_kind, read_moe_peft_folder


@dataclass
class AdapterFolder:
    """A checked adapter folder.

    Attributes:
        path: the folder.
        layout: 'loramix' (format 2), 'loramix-v1', 'peft' (a PEFT LoRA without loramix settings), 'authors'
            (the MixLoRA authors') or 'moe-peft' (MoE-PEFT's LoRAMoE/MoLA).
        config: the config of its kind (``LoraConfig``, ``MixLoraConfig``, ...) that rebuilds the modules.
        family: the model family the adapter is for.
        tensors: loramix state-dict key (``model.layers.0.self_attn.q_proj.lora_A``) → tensor, on CPU,
            read from the file on access (``AdapterTensors``). The authors' format never saved DoRA
            magnitudes: they are absent here (see ``authors.py``).
        meta: the settings as ``read_adapter_config`` returns them (``kind``, ``base_model``, ``extra``, ...).
        weights: the weights file.
        module_shapes: base module path → (out, in) features, as the tensors say.
    """

    path: Path
    layout: str
    config: Any
    family: ModelFamily
    tensors: Mapping[str, torch.Tensor]
    meta: dict[str, Any]
    weights: Path
    module_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.meta.get("base_model")  # whichever file records it (read_adapter_config)

    @property
    def num_layers(self) -> int:
        """How many decoder layers its base has: as recorded, else 1 + the highest layer index of its modules."""
        layers = [where[0] for where in (split_layer(p, self.family) for p in self.module_shapes) if where]
        return self.meta.get("num_layers") or (max(layers) + 1 if layers else 0)


def split_layer(path: str, family: ModelFamily) -> tuple[int, str] | None:
    """``(3, "self_attn.q_proj")`` for ``model.layers.3.self_attn.q_proj``; None for a path outside the layers."""
    prefix = family.layers + "."
    index, _, rest = path[len(prefix):].partition(".")
    return (int(index), rest) if path.startswith(prefix) and index.isdigit() else None


# ====================================================================================== config files
def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; non-UTF-8 bytes, bad JSON or a non-object name the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterLoadError(f"{path}: not UTF-8 text (byte {err.start}); an adapter config is a UTF-8 JSON file: "
                               "rewrite it or save the adapter again") from None
    except OSError as err:
        raise AdapterLoadError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise AdapterLoadError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    if not isinstance(value, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object of settings, found {type(value).__name__}")
    return value


def _run_folder_hint(folder: Path) -> str | None:
    """Where the adapter is, when ``folder`` is a training run or checkpoint folder, else None."""
    if (folder / "adapter" / CONFIG_NAME).is_file():
        return f"it looks like a training run or checkpoint folder: its adapter is {folder / 'adapter'}"
    # loramix's checkpoints/step-N/adapter, or a transformers Trainer's checkpoint-N (itself an adapter folder)
    saved = [p for p in (*folder.glob("checkpoints/step-*/adapter"), *folder.glob("checkpoint-*"))
             if (p / CONFIG_NAME).is_file()]
    if not saved and not (folder / "checkpoints").is_dir():
        return None
    where = f"; the newest checkpoint's adapter is {max(saved, key=checkpoint_step)}" if saved else ""
    return f"it looks like a training run folder without a final adapter/ (the run did not finish?){where}"


def checkpoint_step(path: Path) -> int:
    """N of a checkpoint folder ``step-N`` (loramix), ``step-N/adapter`` or ``checkpoint-N`` (transformers);
    -1 if what follows the first '-' is not a number (``step-3.tmp``, ``step-x``)."""
    number = (path.parent if path.name == "adapter" else path).name.partition("-")[2]
    return int(number) if number.isdecimal() else -1


def read_adapter_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The adapter's settings in loramix's terms, whatever the layout of ``folder``.

    Returns:
        The ``adapter_config.json`` object merged with ``loramix_config.json`` when present, so that
        ``kind``, ``config``, ``model_family`` and ``extra`` are there for loramix folders of every format
        version; PEFT folders keep PEFT's keys (``kind`` is "lora"). ``base_model`` is there for every
        layout: the recorded base model, loramix's ``base_model`` first (it may be an alias), else PEFT's
        ``base_model_name_or_path``, else None.
    """
    folder = Path(folder)
    if not folder.is_dir():
        if folder.is_file():
            raise AdapterLoadError(f"{folder}: a file, not an adapter folder "
                                   f"(give the folder that holds {CONFIG_NAME})")
        raise AdapterLoadError(f"{folder}: no such adapter folder")
    path = folder / CONFIG_NAME
    if not path.is_file():
        hint = _run_folder_hint(folder)
        if hint:
            raise AdapterLoadError(f"{folder}: not an adapter folder; {hint}")
        raise AdapterLoadError(f"{path}: missing (an adapter folder holds {CONFIG_NAME} and the weights)")
    meta = read_json(path)
    if meta.get("peft_type") == "LORA" and meta.get("format") != FORMAT:
        sidecar = folder / SIDECAR_NAME
        meta = {**meta, **read_json(sidecar)} if sidecar.is_file() else {**meta, "kind": "lora"}
    elif is_authors_format(meta):
        meta = {**meta, "kind": "mixlora"}
    elif is_moe_peft_format(meta):
        meta = {**meta, "kind": moe_peft_kind(meta)}
    return {**meta, "base_model": meta.get("base_model") or meta.get("base_model_name_or_path") or None}


# ====================================================================================== tensors
class AdapterTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, read one at a time on access (exports stream them).

    Opening checks the header against the file size, so a truncated or damaged file fails here,
    naming its path. Shapes come from the header without reading any tensor. ``rename``: file key → the
    key this mapping shows (e.g. PEFT's names → loramix's), or None.
    """

    def __init__(self, path: Path, rename: Callable[[str], str] | None = None) -> None:
        self.path = path
        if not path.is_file():
            raise AdapterLoadError(f"{path}: missing adapter weights")
        try:
            self._file = safe_open(str(path), framework="pt")
            file_keys = list(self._file.keys())
            shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in file_keys}
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _damaged(path, err) from None
        self._names = {(rename(k) if rename else k): k for k in file_keys}
        self.shapes = {name: shapes[k] for name, k in self._names.items()}

    def __getitem__(self, key: str) -> torch.Tensor:
        name = self._names[key]
        try:
            return self._file.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _damaged(self.path, err) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _damaged(path: Path, err: Exception) -> AdapterLoadError:
    return AdapterLoadError(f"{path}: not a readable safetensors file ({err}); the file is damaged or was cut short "
                            "(a full disk?): save the adapter again or use a checkpoint's adapter/")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, in memory; a damaged file raises ``AdapterLoadError`` naming it."""
    return dict(AdapterTensors(path))


_FROM_PEFT = {peft: ours for ours, peft in PEFT_NAMES.items()}
_PEFT_KEY = re.compile(rf"^{re.escape(PEFT_PREFIX)}(?P<module>.+)\.(?P<name>{'|'.join(map(re.escape, _FROM_PEFT))})$")


def peft_to_loramix_key(key: str, where: str) -> str:
    """A PEFT LoRA key (``base_model.model.<path>.lora_A.weight``, ``...lora_magnitude_vector``) →
    loramix's (``<path>.lora_A``, ``<path>.lora_magnitude``); anything else is named and refused."""
    m = _PEFT_KEY.match(key)
    if m is None:
        raise AdapterLoadError(
            f"{where}: '{key}' is not a LoRA tensor loramix can load (loramix reads lora_A, lora_B and DoRA's "
            "lora_magnitude_vector; biases, embeddings and modules_to_save are not supported): load it with peft")
    return f"{m['module']}.{_FROM_PEFT[m['name']]}"


# ====================================================================================== shape checks
def _role_of(key: str, kind: AdapterKind) -> tuple[TensorRole, re.Match] | tuple[str, None]:
    """The role of ``key`` among ``kind``'s tensors and its match; else (the name of another kind that has such
    a tensor, None), or ("", None) when no kind has one."""
    for role in kind.roles:
        m = role.match(key)
        if m:
            return role, m
    owner = next((other.name for other in registered_kinds() if any(r.match(key) for r in other.roles)), "")
    return owner, None


def check_tensor_shapes(config, family: ModelFamily, shapes: Mapping[str, tuple[int, ...]], *, weights: Path,
                        config_file: Path, num_layers: int | None = None) -> dict[str, tuple[int, int]]:
    """Every tensor's config-given dimensions (rank, experts, tasks) against ``config``, and the base
    feature sizes (out, in) of each module consistent across its tensors; an ``AdapterLoadError`` names
    the tensor, its shape, and the config key and value it contradicts. The kind says what its tensors look
    like (``AdapterKind.roles``) and which sizes its config sets (``AdapterKind.sizes``).

    ``num_layers`` (the base's decoder layers; None: 1 + the highest layer index of the keys) lays a config whose
    sizes vary by layer over them (``AdapterKind.layer_config``).

    Returns base module path (e.g. ``model.layers.0.mlp.gate_proj``) → (out, in) features, plus
    ``"<ffn path>"`` → (0, hidden) for MixLoRA routers.
    """
    seen: dict[tuple[str, str], tuple[int, str]] = {}  # (base module, 'out'/'in') → (size, key that set it)
    kind = kind_of(config)
    layer_of = {key: split_layer(key, family) for key in shapes}
    if num_layers is None:
        num_layers = 1 + max((where[0] for where in layer_of.values() if where), default=-1)
    try:
        per_layer = [kind.layer_config(config, i, num_layers) for i in range(num_layers)]
    except ConfigError as err:
        raise AdapterLoadError(f"{config_file}: {err}") from None
    for key, shape in shapes.items():
        role, m = _role_of(key, kind)
        if m is None and not role:
            raise AdapterLoadError(f"{weights}: '{key}' is not a tensor of a loramix adapter (unexpected key)")
        if m is None:
            raise AdapterLoadError(f"{weights}: '{key}' is a tensor of a '{role}' adapter, but {config_file.name} "
                                   f"says the adapter is '{config.kind}': the settings and the weights do not belong "
                                   "together; use the adapter's own adapter_config.json")
        module = m["m"]
        symbols, features = role.dims, role.features
        layer = layer_of[key][0] if layer_of[key] and layer_of[key][0] < num_layers else None
        own = config if layer is None else per_layer[layer]
        dims = kind.sizes(own, family, module)
        if len(shape) != len(symbols):
            raise AdapterLoadError(f"{weights}: '{key}' has shape {shape}, but a {role.label} "
                                   f"tensor of this adapter has {len(symbols)} dimension(s)")
        for axis, (symbol, feature) in enumerate(zip(symbols, features)):
            size = int(shape[axis])
            if symbol is not None:
                name, value = dims.get(symbol, (symbol, -1))
                if size != value:
                    said = value if name != "tasks" else config.tasks
                    if own is not config and getattr(config, name, value) != value:  # a layer's share of the setting
                        said = f"{getattr(config, name)!r}, {value} in layer {layer}"
                    raise AdapterLoadError(
                        f"{weights}: '{key}' has shape {shape}, but {config_file.name} says "
                        f"{name} = {said} (dimension {axis} should be {value}): "
                        "the settings and the weights do not belong together; fix the config or save the adapter again")
                continue
            base = f"{module}.{m['p']}" if "p" in m.groupdict() else module  # a projection inside the module
            slot = (base, "in") if feature == "hidden" else (base, feature)
            if slot in seen and seen[slot][0] != size:
                raise AdapterLoadError(
                    f"{weights}: '{key}' has shape {shape}, but '{seen[slot][1]}' says {base} has "
                    f"{seen[slot][0]} {feature} features: the tensors of one module disagree (a damaged adapter)")
            seen.setdefault(slot, (size, key))
    shapes: dict[str, tuple[int, int]] = {}
    for (base, feature), (size, _) in seen.items():
        out, inp = shapes.get(base, (0, 0))
        shapes[base] = (size, inp) if feature == "out" else (out, size)
    return shapes


def expected_keys(config, family: ModelFamily, num_layers: int) -> set[str]:
    """The loramix keys a loramix adapter of ``config`` over ``num_layers`` decoder layers holds
    (DoRA magnitudes included): what ``inject`` creates, the tensors of the kind's sites in every layer."""
    per_layer = layer_sites(config, family, num_layers)
    return {f"{family.layers}.{layer}.{site.path}.{t}" for layer, sites in enumerate(per_layer) for site in sites
            for t in site.tensors}


def check_key_set(adapter: AdapterFolder, config_file: Path) -> None:
    """A loramix folder holds exactly the tensors its settings call for (no model needed, so the
    exports check it too: a module missing from the file would otherwise be exported unmerged)."""
    try:
        expected = expected_keys(adapter.config, adapter.family, int(adapter.num_layers))
    except ConfigError as err:
        raise AdapterLoadError(f"{config_file}: {err}") from None
    mismatch = key_mismatch(expected, set(adapter.tensors))
    if mismatch:
        raise AdapterLoadError(f"{adapter.weights}: the tensors are not those its settings ({config_file.name}, "
                               f"{adapter.num_layers} layers) call for: {mismatch}; the file is incomplete or "
                               "belongs to other settings: save the adapter again")


# ====================================================================================== the model given
def _describe(hidden: int | None, layers: int | None) -> str:
    parts = ([f"hidden size {hidden}"] if hidden else []) + ([f"{layers} layers"] if layers else [])
    return f" ({', '.join(parts)})" if parts else ""


def check_base(model: nn.Module, adapter: AdapterFolder) -> None:
    """The model's shapes against the adapter's: another shape fails once, naming both bases; the same
    shape under another name than the recorded base warns, naming both."""
    recorded, config, given = adapter.base_model, getattr(model, "config", None), base_model_name(model)
    hidden, layers = adapter.meta.get("hidden_size"), adapter.num_layers
    model_layers, model_hidden = getattr(config, "num_hidden_layers", None), getattr(config, "hidden_size", None)
    problem = None
    if adapter.layout != "peft" and model_layers is not None and layers and model_layers != layers:
        problem = f"the adapter has {layers} layers, the model {model_layers}"
    if problem is None and hidden and model_hidden and hidden != model_hidden:
        problem = f"the adapter's hidden size is {hidden}, the model's {model_hidden}"
    # Another base differs in the same projection of every layer; a damaged file in a few modules,
    # which the key-by-key check after injection names instead.
    checked: dict[str, set[int | None]] = {}  # projection without layer index → layers checked
    differs: dict[str, tuple[set[int | None], str]] = {}  # ... → (layers that differ, first description)
    for path, (out, inp) in adapter.module_shapes.items() if problem is None else ():
        if out == 0:  # a MixLoRA router's entry: (0, hidden) of the FFN block
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue  # a key the model has no place for: named by the key check after injection
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        layer, name = split_layer(path, adapter.family) or (None, path)
        checked.setdefault(name, set()).add(layer)
        # logical_shape: a quantized weight is stored packed ((n, 1) codes for bitsandbytes 4-bit)
        have = tuple(logical_shape(module, adapter.family.fan_in_fan_out)[::-1])
        if have != (out, inp):
            text = f"'{path}' is (out, in) = {have} in the model, {(out, inp)} in the adapter"
            differs.setdefault(name, (set(), text))[0].add(layer)
    for name, (layers_differ, text) in differs.items():
        if layers_differ == checked[name]:
            problem = text
            break
    if problem is not None:
        raise AdapterLoadError(
            f"{adapter.path}: this adapter was trained on base model '{recorded or 'not recorded'}'"
            f"{_describe(hidden, layers)}, but the model given "
            f"('{given or 'unnamed'}'{_describe(model_hidden, model_layers)}) has other shapes: {problem}. "
            f"Load the adapter onto '{recorded or 'its base model'}'.")
    from .. import hub  # here, not at the top: `import loramix` leaves hub unimported (see peft.peft_adapter_files)

    ours, theirs = hub.canonical_name(recorded), hub.canonical_name(given)
    if ours and theirs and ours != theirs:
        warnings.warn(
            f"{adapter.path}: adapter trained on base model '{recorded}' is being loaded onto '{given}'; the shapes "
            "match, so it loads, but unless these are the same weights its outputs are not what was trained",
            UserWarning, stacklevel=4)  # check_base ← read_adapter_folder ← load_adapter ← the caller


# ====================================================================================== the reader
def _lora_config_from_peft(meta: dict[str, Any], family: ModelFamily, shapes_keys: list[str],
                           where: Path) -> LoraConfig:
    """A ``LoraConfig`` for a PEFT LoRA folder without loramix settings (written by another tool)."""
    if meta.get("rank_pattern") or meta.get("alpha_pattern"):
        raise AdapterLoadError(f"{where}: per-module ranks (rank_pattern/alpha_pattern) are not a loramix LoRA; "
                               "load this adapter with peft (PeftModel.from_pretrained)")
    # PEFT LoRA variants that compute something else than W x + s B A x on every layer's projections
    variants = ("modules_to_save", "layers_to_transform", "layer_replication", "trainable_token_indices",
                "target_parameters", "lora_bias", "use_qalora", "alora_invocation_tokens", "use_bdlora", "arrow_config",
                "kasa_config")
    checks = [("bias", meta.get("bias", "none") == "none"),
              ("fan_in_fan_out", bool(meta.get("fan_in_fan_out", False)) == family.fan_in_fan_out),
              *((key, not meta.get(key)) for key in variants)]
    for key, ok in checks:
        if not ok:
            raise AdapterLoadError(f"{where}: '{key}' = {meta.get(key)!r} is not supported by loramix's LoRA; "
                                   "load this adapter with peft")
    # Targets: the (block, projection) pairs that hold tensors, written block-qualified when ambiguous.
    pairs = sorted({tuple(k.rsplit(".", 3)[1:3]) for k in shapes_keys})
    names = [p for _, p in pairs]
    targets = sorted({p if names.count(p) == 1 else f"{b}.{p}" for b, p in pairs})
    init = meta.get("init_lora_weights", True)
    try:
        return LoraConfig(r=int(meta["r"]), alpha=meta["lora_alpha"], dropout=float(meta.get("lora_dropout", 0.0)),
                          targets=targets, use_rslora=bool(meta.get("use_rslora", False)),
                          use_dora=bool(meta.get("use_dora", False)),
                          init="gaussian" if init == "gaussian" else "kaiming")
    except ConfigError as err:
        raise AdapterLoadError(f"{where}: {err}") from None


def read_adapter_folder(folder: str | os.PathLike, model: nn.Module | None = None) -> AdapterFolder:
    """Read and check an adapter folder (any layout of the module docstring) into an ``AdapterFolder`` whose
    tensors carry loramix keys; ``AdapterLoadError`` names the folder, file and key and says what to do.

    ``model`` is the base model it is for, if known: its family is used where the folder records none
    (PEFT and the authors' folders), and its shapes are checked (``check_base``).
    """
    folder = Path(folder)
    meta = read_adapter_config(folder)
    config_file = folder / CONFIG_NAME
    family = family_of(model) if model is not None else None
    if is_authors_format(meta):
        if family is None:
            raise AdapterLoadError(f"{config_file}: the MixLoRA authors' format names no model family; "
                                   "give the base model (loramix.load_adapter(model, folder))")
        layout, config, tensors, weights = "authors", *read_authors_folder(folder, meta, family)
    elif is_moe_peft_format(meta):
        if family is None:
            raise AdapterLoadError(f"{config_file}: MoE-PEFT's format names no model family; "
                                   "give the base model (loramix.load_adapter(model, folder))")
        layout, config, tensors, weights = "moe-peft", *read_moe_peft_folder(folder, meta, family)
    elif meta.get("format") == FORMAT:  # loramix's settings (in adapter_config.json, or beside a PEFT config)
        version = meta.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise AdapterLoadError(f"{config_file}: format_version {version!r} is newer than this loramix reads "
                                   "(upgrade loramix)")
        for key in ("kind", "config"):
            if key not in meta:
                raise AdapterLoadError(f"{config_file}: missing key '{key}'")
        where = folder / SIDECAR_NAME if meta.get("peft_type") == "LORA" else config_file
        recorded_family = meta.get("model_family")
        if recorded_family not in FAMILIES:
            raise AdapterLoadError(f"{where}: unknown model_family {recorded_family!r} "
                                   f"(known: {', '.join(sorted(FAMILIES))})")
        if family is not None and family.name != recorded_family:
            raise AdapterLoadError(f"{where}: adapter was saved for model family '{recorded_family}', "
                                   f"but this model is '{family.name}'")
        family = FAMILIES[recorded_family]
        try:
            config = adapter_config_from_dict(meta["kind"], meta["config"], where=f"{where} 'config'")
        except ConfigError as err:
            raise AdapterLoadError(str(err)) from None
        weights = folder / WEIGHTS_NAME
        if meta.get("peft_type") == "LORA":
            _check_peft_agrees(meta, config, config_file, where)
            tensors = AdapterTensors(weights, rename=lambda k: peft_to_loramix_key(k, str(weights)))
            layout = "loramix"
        else:
            tensors = AdapterTensors(weights)
            layout = "loramix" if version >= 2 else "loramix-v1"
    elif meta.get("peft_type") == "LORA":
        if family is None:
            raise AdapterLoadError(f"{config_file}: a PEFT LoRA folder without {SIDECAR_NAME} records no model family; "
                                   "give the base model (loramix.load_adapter(model, folder))")
        for key in ("r", "lora_alpha"):
            if not is_number(meta.get(key)):
                raise AdapterLoadError(f"{config_file}: '{key}' is missing or not a number")
        weights = folder / WEIGHTS_NAME
        tensors = AdapterTensors(weights, rename=lambda k: peft_to_loramix_key(k, str(weights)))
        config = _lora_config_from_peft(meta, family, list(tensors), config_file)
        layout = "peft"
    elif "peft_type" in meta:
        raise AdapterLoadError(f"{config_file}: a PEFT '{meta['peft_type']}' adapter; loramix reads LoRA/DoRA PEFT "
                               "adapters only: load it with peft (PeftModel.from_pretrained)")
    else:
        raise AdapterLoadError(f"{config_file}: not a loramix adapter "
                               f"(no \"format\": \"{FORMAT}\" and no \"peft_type\")")
    shapes = tensors.shapes if isinstance(tensors, AdapterTensors) else {k: tuple(v.shape) for k, v in tensors.items()}
    recorded = meta.get("num_layers")
    shapes = check_tensor_shapes(config, family, shapes, weights=weights, config_file=config_file,
                                 num_layers=recorded if is_int(recorded, minimum=1) else None)
    adapter = AdapterFolder(path=folder, layout=layout, config=config, family=family, tensors=tensors, meta=meta,
                            weights=weights, module_shapes=shapes)
    if layout in ("loramix", "loramix-v1", "moe-peft"):  # PEFT folders may skip layers; MixLoRA authors' lack DoRA
        check_key_set(adapter, config_file)
    if model is not None:
        check_base(model, adapter)
    return adapter


def _check_peft_agrees(meta: dict[str, Any], config: LoraConfig, config_file: Path, sidecar: Path) -> None:
    """PEFT's fields of a loramix LoRA folder must say what loramix's settings say (both are read:
    PEFT by other tools, loramix's by loramix)."""
    pairs = (("r", "r"), ("lora_alpha", "alpha"), ("use_dora", "use_dora"), ("use_rslora", "use_rslora"))
    for peft_key, ours in pairs:
        if meta.get(peft_key) != getattr(config, ours):
            raise AdapterLoadError(
                f"{config_file}: '{peft_key}' is {meta.get(peft_key)!r} but {sidecar.name} says {ours} = "
                f"{getattr(config, ours)!r}: the two settings files disagree; save the adapter again")
