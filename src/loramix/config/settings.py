"""The settings machinery every loramix config shares: its errors, the guarded YAML reader, ``Settings``
(``from_dict`` with unknown keys named and the closest valid one suggested, type and range checks),
the value checks (``is_int``, ``is_seed``, ``is_number``), the dtype names, and ``AdapterSettings``,
the checks the adapter kinds' configs share.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import field
from typing import Any, ClassVar, Union

import yaml

ROUTINGS = ("top_k", "top_p", "switch")
INITS = ("kaiming", "gaussian")
DISPATCHES = ("sorted", "naive")
# The one table of dtype names that every dtype option and key accepts (dtype:, adapter_dtype:, --dtype,
# bench --dtype): each name → its canonical (torch) name. hub.DTYPES maps the same names to torch dtypes.
DTYPE_NAMES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the default: a llama-like family's attention
INIT_HELP = "Initialisation of A: 'kaiming' (uniform) or 'gaussian'. B starts at zero."
ADAPTER_DTYPE_HELP = (
    "dtype of the adapter tensors: null (default) = float32 next to a half-precision or quantized (4/8-bit) "
    "base, else the base's dtype; or float32 | bfloat16 | float16 (or fp32, float, bf16, fp16, half)."
)


def dtype_name(name: Any) -> str | None:
    """The canonical name of a dtype name from ``DTYPE_NAMES`` (any case, "torch." allowed), else None.

    Example: ``dtype_name("BF16") == dtype_name(torch.bfloat16) == "bfloat16"``; ``dtype_name("int8") is None``.
    """
    return DTYPE_NAMES.get(str(name).lower().removeprefix("torch."))


class UsageError(ValueError):
    """A bad command-line value (an option, a device, a prompt); the message names the option."""


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it and where it came from.

    ``key`` is the setting a message is about (``ConfigError("must be positive, got 0", "lr")`` reads
    "'lr' must be positive, got 0"); a nested reader prefixes it (``r`` → ``adapter.r``).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(f"'{key}' {message}" if key else message)
        self.key, self.detail = key, message

    def nested(self, prefix: str) -> "ConfigError":
        """The same error about ``prefix + key`` (unchanged when it names no key)."""
        return ConfigError(self.detail, prefix + self.key) if prefix and self.key else self


# The most values (scalars, lists, mappings; an alias counts as everything it repeats) a YAML that loramix
# reads may expand to. The largest real one, a multi-adapter config, holds a few thousand; nine levels of
# nine aliases ("billion laughs") expand to 9**9 and would hang every walk over the loaded value.
MAX_YAML_VALUES = 100_000


def load_yaml(text: str, where: str) -> Any:
    """The value of the YAML ``text`` (plain types only, as ``yaml.safe_load``): the one reader of every YAML a
    user gives loramix (training and multi-adapter configs, prompt templates, ``key=value`` overrides).

    It refuses, before building anything, a document whose aliases expand it beyond ``MAX_YAML_VALUES``
    values or refer to themselves (an endless value).

    Raises:
        ConfigError: naming ``where`` (a file): not YAML (with the line and column), or too large expanded.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, where)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except ValueError as err:  # a well-formed value Python cannot build: date 2024-13-01, an int of 5000 digits
        raise ConfigError(f"{where}: a value cannot be read: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML{line}: {getattr(err, 'problem', None) or err}") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: yaml.Node, where: str) -> None:
    """Count the values of ``root`` with every alias expanded (each node once, memoised: linear in the file)."""
    sizes: dict[int, int] = {}  # id(node) -> its expanded size
    open_nodes: set[int] = set()  # nodes whose children are being counted: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        children = _yaml_children(node)
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise ConfigError(f"{where}: holds more than {MAX_YAML_VALUES} values once its YAML aliases ('*name' "
                                  "repeats what '&name' marks) are expanded; a loramix file needs far fewer: use "
                                  "fewer aliases")
        elif id(node) not in sizes:
            if id(node) in open_nodes:
                raise ConfigError(f"{where}: a YAML alias ('*name') refers to a list or mapping that holds it, an "
                                  "endless value")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)


def _yaml_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def help_field(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a ``default`` (or a default ``factory``) and its help text."""
    return field(default=default, default_factory=factory, metadata={"help": text})


class Settings:
    """Base of every config dataclass (the adapter configs here, ``train.config.TrainConfig``): one reader
    and one set of checks.

    ``from_dict`` checks the keys (a typo gets the closest valid name), each value against the field's
    annotation (int, float, bool, str, list, dict, optional, a nested ``Settings``, or one of several
    ``Settings`` picked by a ``kind`` key), then ``__post_init__`` checks ranges with ``_check``. An error
    names ``where`` (a file) and the dotted key (``adapter.r``).
    """

    kind: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config"):
        """Build from a plain dict (YAML/JSON); a wrong key or value raises ``ConfigError`` naming it and ``where``."""
        try:
            return _build(cls, values, "")
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def _check(self, name: str, ok: bool, expected: str, value: Any = dataclasses.MISSING) -> None:
        """Raise "'name' must be EXPECTED, got VALUE" unless ``ok`` (value: the field's, unless given)."""
        if not ok:
            value = getattr(self, name) if value is dataclasses.MISSING else value
            raise ConfigError(f"must be {expected}, got {value!r}", name)

    def _check_numbers(self, *names: str, positive: bool = False, integer: bool = False) -> None:
        """Each of ``names`` is a number (an int, not a bool, with ``integer``): > 0 with ``positive``, else >= 0."""
        kind = "integer" if integer else "number"
        expected = f"a positive {kind}" if positive else f"{'an' if integer else 'a'} {kind} >= 0"
        for name in names:
            value = getattr(self, name)
            ok = (is_int(value) if integer else is_number(value)) and (value > 0 if positive else value >= 0)
            self._check(name, ok, expected)


def _build(cls: type, values: Any, prefix: str) -> Any:
    """``cls(**values)`` after checking keys and value types; errors name ``prefix + key``."""
    if not isinstance(values, dict):
        where = f"'{prefix.rstrip('.')}' must be" if prefix else "expected"
        raise ConfigError(f"{where} a mapping of settings, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{prefix}{key}'.{hint} Valid keys: {', '.join(sorted(names))}")
        kwargs[key] = _read_value(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise err.nested(prefix) from None


def _read_value(annotation: Any, value: Any, key: str) -> Any:
    """``value`` checked against ``annotation``; a mapping for a ``Settings`` field is built into one."""
    union = typing.get_origin(annotation) in (Union, types.UnionType)
    options = typing.get_args(annotation) if union else (annotation,)
    settings = tuple(o for o in options if isinstance(o, type) and issubclass(o, Settings))
    if settings and isinstance(value, settings):
        return value  # already built (Python callers)
    if len(settings) == 1 and not union:
        return _build(settings[0], value, key + ".")
    if settings:  # one of several kinds, named by the mapping's 'kind'
        kinds = {o.kind: o for o in settings}
        if not isinstance(value, dict) or "kind" not in value:
            raise ConfigError(f"must be a mapping with a 'kind' ({', '.join(kinds)}), got {value!r}", key)
        if value["kind"] not in kinds:
            raise ConfigError(f"must be one of {', '.join(kinds)}, got {value['kind']!r}", f"{key}.kind")
        return _build(kinds[value["kind"]], {k: v for k, v in value.items() if k != "kind"}, key + ".")
    if not _type_ok(value, annotation):
        raise ConfigError(f"must be {_describe(annotation)}, got {value!r}", key)
    return value


def is_int(value: Any, minimum: int | None = None) -> bool:
    """An int that is not a bool, at least ``minimum`` when given."""
    return isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)


# torch's generators take seeds below 2**64, and distributed training seeds rank k with seed + k: a seed below
# 2**63 leaves that room (and fits the signed 64-bit seeds other libraries take).
MAX_SEED = 2**63 - 1
SEED_RANGE = "an integer from 0 to 2**63 - 1"


def is_seed(value: Any) -> bool:
    """An int (not a bool) that every seeded generator takes: 0 <= value <= ``MAX_SEED``."""
    return is_int(value, minimum=0) and value <= MAX_SEED


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits ``annotation`` (int/float/bool/str/list/dict/optional/Any); ints pass as floats."""
    if annotation is Any:
        return True
    if typing.get_origin(annotation) in (Union, types.UnionType):
        return any(value is None if a is type(None) else _type_ok(value, a) for a in typing.get_args(annotation))
    annotation = typing.get_origin(annotation) or annotation  # list[...] / dict[...]
    if annotation is float:
        return is_number(value)
    if annotation is int:
        return is_int(value)
    if annotation in (bool, str, list, dict):
        return isinstance(value, annotation)
    return True


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
               dict: "a mapping"}


def _describe(annotation: Any) -> str:
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return " or ".join("null" if a is type(None) else _TYPE_WORDS.get(typing.get_origin(a) or a, str(a)) for a in args)


class AdapterSettings(Settings):
    """The checks the adapter configs share."""

    def _check_lora(self, prefix: str = "", rank: str = "r") -> None:
        """Rank, alpha and dropout of a LoRA (``prefix`` 'attention_': MixLoRA's attention LoRA, where null
        means "as the experts")."""
        r, alpha, dropout = (getattr(self, prefix + n) for n in (rank, "alpha", "dropout"))
        if r is not None:
            self._check_numbers(prefix + rank, positive=True, integer=True)
        if alpha is not None:
            self._check_numbers(prefix + "alpha", positive=True)
        if dropout is not None:
            self._check(prefix + "dropout", is_number(dropout) and 0 <= dropout < 1, "in [0, 1)")

    def _check_common(self, *flags: str) -> None:
        """The true/false ``flags``, ``init`` and ``adapter_dtype``."""
        for name in flags:
            self._check(name, isinstance(getattr(self, name), bool), "true or false")
        self._check("init", self.init in INITS, f"one of {INITS}")
        if self.adapter_dtype is not None:
            canonical = dtype_name(self.adapter_dtype)
            self._check("adapter_dtype", canonical is not None, f"null or one of {', '.join(DTYPE_NAMES)}")
            self.adapter_dtype = canonical  # "bf16" is stored, saved and compared as "bfloat16"

    def _check_targets(self, name: str) -> None:
        value = getattr(self, name)
        ok = value is None or (isinstance(value, (list, tuple)) and all(isinstance(t, str) and t for t in value))
        self._check(name, ok, "null (all of the family's projections) or a list of projection names")
        if isinstance(value, tuple):
            setattr(self, name, list(value))

    def _check_task_names(self) -> None:
        """``tasks``: null or a non-empty list of distinct names (MoRE's tasks, LoRAMoE's sample types)."""
        if self.tasks is not None:
            ok = isinstance(self.tasks, (list, tuple)) and len(self.tasks) > 0 and all(
                isinstance(t, str) and t for t in self.tasks) and len(set(self.tasks)) == len(self.tasks)
            self._check("tasks", ok, "null or a non-empty list of distinct task names")
            self.tasks = list(self.tasks)

    @property
    def scale(self) -> float:
        """The LoRA output scale ``s``: alpha / r, or alpha / sqrt(r) with rsLoRA (MixLoRA: the experts';
        ``attention_lora().scale`` is the attention LoRA's)."""
        return self.alpha / (self.r**0.5) if self.use_rslora else self.alpha / self.r
