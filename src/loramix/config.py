"""Adapter configurations: one dataclass per adapter kind, validated on construction.

Every field has a help string (``field(metadata={"help": ...})``) so the CLI and the README can list
them. ``from_dict`` (``Settings``, shared with the training config) rejects unknown keys with the
closest valid name and values of the wrong type, so a typo in a YAML file never passes silently.

Example:
    >>> cfg = MixLoraConfig(r=16, alpha=32, num_experts=8, top_k=2)
    >>> MixLoraConfig.from_dict(cfg.to_dict()) == cfg
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
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


class _AdapterSettings(Settings):
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


@dataclass
class LoraConfig(_AdapterSettings):
    """Plain LoRA (and rsLoRA, DoRA) on the named linear projections.

    ``y = W z + s · B A dropout(z)`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``).
    """

    kind: ClassVar[str] = "lora"

    r: int = help_field("LoRA rank.", 8)
    alpha: float = help_field("LoRA alpha; the scale is alpha / r (alpha / sqrt(r) with use_rslora).", 16)
    dropout: float = help_field("Dropout on the LoRA input (0 allowed).", 0.05)
    targets: list[str] | None = help_field(
        "Projection names to adapt, e.g. [q_proj, v_proj] or 'mlp.c_proj' to disambiguate; "
        "null adapts every attention and FFN projection of the model family.",
        factory=lambda: list(ATTENTION_TARGETS),
    )
    use_dora: bool = help_field("DoRA: learned magnitude per output feature times the normalised weight.", False)
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r).", False)
    init: str = help_field(INIT_HELP, "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_dora", "use_rslora")


@dataclass
class MixLoraConfig(_AdapterSettings):
    """MixLoRA: sparse top-k mixture of LoRA experts in the FFN, independent LoRA in attention.

    Attention settings (``attention_r`` ...) default to the expert ones when left null.
    """

    kind: ClassVar[str] = "mixlora"

    r: int = help_field("Rank of every expert LoRA.", 16)
    alpha: float = help_field("Expert LoRA alpha (scale alpha / r).", 32)
    dropout: float = help_field("Expert LoRA input dropout (0 allowed).", 0.05)
    num_experts: int = help_field("Experts per FFN block.", 8)
    top_k: int = help_field("Experts per token for routing 'top_k'.", 2)
    routing: str = help_field("'top_k' (default), 'top_p' (dynamic) or 'switch' (top-1 with capacity).", "top_k")
    top_p: float = help_field("routing top_p: keep the smallest prefix of experts reaching this probability.", 0.8)
    temperature: float = help_field("routing top_p: the router logits are divided by this.", 1.0)
    max_experts: int | None = help_field("routing top_p: cap on experts per token (null: no cap).", None)
    capacity_factor: float = help_field("routing switch: capacity = ceil(capacity_factor * tokens / experts).", 1.0)
    attention_targets: list[str] | None = help_field(
        "Attention projections given a plain LoRA (null: all of the family's, [] : none).",
        factory=lambda: list(ATTENTION_TARGETS),
    )
    ffn_targets: list[str] | None = help_field(
        "FFN projections given expert LoRAs (null: all of the family's); the others stay frozen.",
        factory=lambda: ["gate_proj", "up_proj", "down_proj"],
    )
    attention_r: int | None = help_field("Rank of the attention LoRA (null: r).", None)
    attention_alpha: float | None = help_field("Alpha of the attention LoRA (null: alpha).", None)
    attention_dropout: float | None = help_field("Dropout of the attention LoRA (null: dropout).", None)
    use_dora: bool = help_field("DoRA experts and attention LoRA.", False)
    use_rslora: bool = help_field("rsLoRA scaling for experts and attention LoRA.", False)
    init: str = help_field(INIT_HELP, "kaiming")
    aux_loss_coef: float = help_field("Weight of the load-balance loss added to the LM loss.", 0.01)
    z_loss_coef: float = help_field("Weight of the router z-loss.", 0.0)
    jitter: float = help_field("Training only: router input multiplied by U(1-jitter, 1+jitter).", 0.0)
    router_init_std: float = help_field("Std of the normal init of the router weight.", 0.02)
    dispatch: str = help_field("'sorted' (fast path) or 'naive' (per-expert loop, for comparison).", "sorted")
    recompute_experts: bool = help_field(
        "Recompute the expert activations in backward instead of keeping them (less memory, ~1 more FFN forward).",
        False,
    )
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_lora("attention_")
        self._check_targets("attention_targets")
        self._check_targets("ffn_targets")
        self._check_common("use_dora", "use_rslora", "recompute_experts")
        self._check_numbers("num_experts", positive=True, integer=True)
        self._check("routing", self.routing in ROUTINGS, f"one of {ROUTINGS}")
        if self.routing == "top_k":
            ok = is_int(self.top_k, minimum=1) and self.top_k <= self.num_experts
            self._check("top_k", ok, f"an integer in [1, num_experts={self.num_experts}]")
        self._check("top_p", is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]")
        if self.max_experts is not None:
            ok = is_int(self.max_experts, minimum=1) and self.max_experts <= self.num_experts
            self._check("max_experts", ok, f"null or an integer in [1, {self.num_experts}]")
        self._check_numbers("temperature", "capacity_factor", positive=True)
        self._check_numbers("aux_loss_coef", "z_loss_coef", "jitter", "router_init_std")
        self._check("jitter", self.jitter < 1, "in [0, 1)")
        self._check("dispatch", self.dispatch in DISPATCHES, f"one of {DISPATCHES}")

    def attention_lora(self) -> LoraConfig:
        """The attention LoRA settings, with nulls filled from the expert settings."""
        own = {"r": self.attention_r, "alpha": self.attention_alpha, "dropout": self.attention_dropout}
        return dataclasses.replace(self.expert_lora(), targets=self.attention_targets,
                                   **{k: v for k, v in own.items() if v is not None})

    def expert_lora(self) -> LoraConfig:
        """The per-expert LoRA settings."""
        return LoraConfig(
            r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.ffn_targets,
            use_dora=self.use_dora, use_rslora=self.use_rslora, init=self.init, adapter_dtype=self.adapter_dtype,
        )


SELECTORS = ("ste", "frozen_random")


@dataclass
class MoreConfig(_AdapterSettings):
    """MoRE: nested low-rank experts with a per-task adaptive rank selector (arXiv 2505.22694).

    Every targeted projection holds one LoRA of rank ``max_rank``; expert ``k`` is its first ``k``
    components, and a selector fed with a learned task embedding picks one expert per task:
    ``y = W z + w · s · B[:, :k_t] diag(c²) A[:k_t] dropout(z)``. Tasks are named in ``tasks`` and
    numbered in that order (``task_ids`` passed to the model index this list).
    """

    kind: ClassVar[str] = "more"

    max_rank: int = help_field("R, the rank of the shared LoRA; expert k uses its first k components.", 8)
    ranks: list[int] | None = help_field("The rank set the selector chooses from (null: 1..max_rank), e.g. [2, 4, 8].", None)
    alpha: float = help_field("LoRA alpha; the scale is alpha / max_rank.", 32)
    dropout: float = help_field("Dropout on the LoRA input (0 allowed).", 0.1)
    targets: list[str] | None = help_field(
        "Projection names to adapt (attention and/or FFN, e.g. [q_proj, v_proj, down_proj]); "
        "null adapts every attention and FFN projection of the model family.", None,
    )
    tasks: list[str] | None = help_field(
        "Task names, numbered in this order (task_ids index them). Null: filled by the trainer from the "
        "data, or task0..task{num_tasks-1} when num_tasks is set.", None,
    )
    num_tasks: int | None = help_field("Number of tasks (null: len(tasks)).", None)
    linear_scaling: bool = help_field(
        "Scale component i by c_i = i/max_rank on its A row and B column (c_i² overall).", True,
    )
    contrastive_coef: float = help_field("λ, weight of the task contrastive loss added to the LM loss.", 0.1)
    temperature: float = help_field("τ of the task contrastive loss.", 0.05)
    selector: str = help_field(
        "'ste' (selector trained through the straight-through estimator, the paper) or 'frozen_random' "
        "(ranks drawn once from the random initial selector and frozen, the authors' released code).", "ste",
    )
    task_embedding_std: float = help_field("Std of the normal init of the task embeddings.", 0.01)
    init: str = help_field(INIT_HELP, "kaiming")
    default_task: str | None = help_field(
        "Task used when the model is called without task_ids (null: the only task of a one-task adapter; "
        "with several tasks a missing task_ids is an error).", None,
    )
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora(rank="max_rank")
        self._check_common("linear_scaling")
        self._check_targets("targets")
        if self.ranks is not None:
            ok = isinstance(self.ranks, (list, tuple)) and len(self.ranks) > 0 and all(
                is_int(k) and 1 <= k <= self.max_rank for k in self.ranks)
            self._check("ranks", ok, f"null or a non-empty list of integers in [1, max_rank={self.max_rank}]")
            self.ranks = sorted(set(self.ranks))
        self._check_task_names()
        if self.num_tasks is not None:
            self._check("num_tasks", is_int(self.num_tasks) and self.num_tasks > 0, "null or a positive integer")
            if self.tasks is None:
                self.tasks = [f"task{i}" for i in range(self.num_tasks)]
            elif self.num_tasks != len(self.tasks):
                raise ConfigError(f"is {self.num_tasks} but 'tasks' names {len(self.tasks)} tasks", "num_tasks")
        elif self.tasks is not None:
            self.num_tasks = len(self.tasks)
        self._check_numbers("contrastive_coef", "task_embedding_std")
        self._check_numbers("temperature", positive=True)
        self._check("selector", self.selector in SELECTORS, f"one of {SELECTORS}")
        if self.default_task is not None:
            ok = isinstance(self.default_task, str) and (self.tasks is None or self.default_task in self.tasks)
            self._check("default_task", ok, f"null or one of the task names {self.tasks}")

    def named_tasks(self) -> list[str]:
        """``tasks``, or a ConfigError saying how to name them (the trainer fills them from the data first)."""
        if not self.tasks:
            raise ConfigError("MoRE config names no tasks: set 'tasks' (names, numbered in order) or 'num_tasks'")
        return self.tasks

    @property
    def scale(self) -> float:
        """``s = alpha / max_rank``, the scale of every nested expert (before its ``c²``)."""
        return self.alpha / self.max_rank

    @property
    def rank_set(self) -> list[int]:
        """The ranks the selector chooses from, ascending."""
        return list(self.ranks) if self.ranks is not None else list(range(1, self.max_rank + 1))


MOLA_MAX_EXPERTS = 256  # above it an int is an unquoted allocation (YAML reads 2468 as a number), not a count


@dataclass
class MolaConfig(_AdapterSettings):
    """MoLA (Gao et al., arXiv 2402.08562): top-k routed LoRA experts on each targeted projection, with
    layer-wise expert counts ("higher layers need more LoRA experts").

    ``y = W z + s · Σ_{e ∈ topk(p)} (p_e / Σ_{j ∈ topk} p_j) · B_e A_e dropout(z)`` with ``p = softmax(W_r z)``
    over the E_l experts of the projection's layer l. ``num_experts`` lays E_l over the layers: one count for every
    layer, a digit string naming the counts of equal contiguous layer groups from the lowest layers up (the paper's
    "2468", "8642", "5555", "3333", ...), or one count per layer. Defaults are the paper's where it gives them:
    allocation 2468 (its best, MoLA-▽), top-2, rank 8, alpha 16, every attention and FFN projection; dropout 0.05
    and the router init N(0, 0.02) are assumed (MoE-PEFT's, the paper says neither). The paper has no balancing
    loss (``aux_loss_coef`` 0); the optional one is the Switch loss MixLoRA uses.
    """

    kind: ClassVar[str] = "mola"

    r: int = help_field("Rank of every expert LoRA (the paper: 8).", 8)
    alpha: float = help_field("Expert LoRA alpha; the scale is alpha / r (the paper: 16).", 16)
    dropout: float = help_field("Dropout on the LoRA input, one mask shared by the experts (0 allowed).", 0.05)
    num_experts: int | str | list[int] = help_field(
        "Experts per adapted projection, by layer: an integer (every layer), an allocation string of digits 1-9 "
        "giving the count of each of len(string) equal contiguous layer groups from the lowest layers up (layer i "
        "of L is in group i * len // L; '2468': 2/4/6/8 experts in the four quarters, the paper's best; also "
        "'8642', '5555', '3333'; quote it in YAML), or a list with one count per decoder layer.", "2468",
    )
    top_k: int = help_field("Experts per token, at most the smallest layer's count (the paper: 2).", 2)
    targets: list[str] | None = help_field(
        "Projections given MoLA experts, attention and/or FFN, e.g. [q_proj, v_proj] (null: every attention and "
        "FFN projection of the model family, as the paper).", None,
    )
    aux_loss_coef: float = help_field(
        "Weight of the Switch load-balance loss E · Σ_i f_i P_i (per module, over the non-padding tokens) added to "
        "the LM loss; 0: none, as the paper.", 0.0,
    )
    router_init_std: float = help_field("Std of the normal init of the router weights.", 0.02)
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r) for the experts.", False)
    init: str = help_field(INIT_HELP, "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_rslora")
        self._check_numbers("aux_loss_coef", "router_init_std")
        counts = self._allocation()
        self._check("top_k", is_int(self.top_k, minimum=1) and self.top_k <= min(counts),
                    f"an integer in [1, {min(counts)}] (the fewest experts num_experts={self.num_experts!r} gives "
                    "a layer)")

    def _allocation(self) -> list[int]:
        """The counts ``num_experts`` names, in order (one entry: every layer); checks and normalises it."""
        value = self.num_experts
        expected = (f"an integer in [1, {MOLA_MAX_EXPERTS}], a string of digits 1-9 such as '2468' (per layer "
                    "group, lowest first) or a list of positive integers (one per layer)")
        if isinstance(value, tuple):
            value = self.num_experts = list(value)
        if is_int(value):
            hint = " (an allocation such as 2468 must be quoted in YAML: '2468')" if value > MOLA_MAX_EXPERTS else ""
            self._check("num_experts", 1 <= value <= MOLA_MAX_EXPERTS, expected + hint)
            return [value]
        if isinstance(value, str):
            self._check("num_experts", value.isascii() and value.isdigit() and "0" not in value, expected)
            return [int(c) for c in value]
        ok = isinstance(value, list) and len(value) > 0 and all(is_int(n, minimum=1) for n in value)
        self._check("num_experts", ok, expected)
        return list(value)

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """E_l for each of ``num_layers`` decoder layers, e.g. '2468' over 8 layers → [2, 2, 4, 4, 6, 6, 8, 8];
        a ``ConfigError`` naming num_experts when it cannot be laid over them."""
        counts = self._allocation()
        if is_int(self.num_experts):
            return counts * num_layers
        if isinstance(self.num_experts, list):
            if len(counts) != num_layers:
                raise ConfigError(f"lists {len(counts)} per-layer counts, but the model has {num_layers} decoder "
                                  "layers: give one per layer, or an allocation string such as '2468'", "num_experts")
            return counts
        if len(counts) > num_layers:
            raise ConfigError(f"{self.num_experts!r} names {len(counts)} layer groups, but the model has only "
                              f"{num_layers} decoder layers: use at most {num_layers} digits", "num_experts")
        return [counts[i * len(counts) // num_layers] for i in range(num_layers)]


@dataclass
class LoraMoeConfig(_AdapterSettings):
    """LoRAMoE (Dou et al., arXiv 2312.09979): a dense mixture of LoRA experts on each FFN projection.

    ``y = W z + Σ_e g_e(z) · s · B_e A_e dropout(z)`` with ``g = softmax(W_r z)`` over all experts (every
    expert contributes). The localized balancing constraint splits the experts into groups, one per sample
    type (``tasks``), and adds ``balance_coef · CV²(I ∘ Q)``: Q (samples, experts) the summed router weights
    of each sample's tokens, I = 1 + balance_delta where an expert's group is the sample's type, else
    1 - balance_delta. Defaults are the paper's (6 experts of rank 4 on gate/up/down, β = δ = 0.1; alpha 32
    and dropout 0.05 from the authors' script).
    """

    kind: ClassVar[str] = "loramoe"

    r: int = help_field("Rank of every expert LoRA (the paper: 4).", 4)
    alpha: float = help_field("Expert LoRA alpha; the scale is alpha / r (the authors' script: 32).", 32)
    dropout: float = help_field("Dropout on the LoRA input, one mask shared by the experts (0 allowed).", 0.05)
    num_experts: int = help_field("LoRA experts per adapted projection (the paper: 6).", 6)
    targets: list[str] | None = help_field(
        "FFN projections given a LoRAMoE layer, e.g. [gate_proj, up_proj, down_proj] (null: every FFN projection "
        "of the model family, as the paper).", None,
    )
    tasks: list[str] | None = help_field(
        "Sample types of the localized balancing constraint, in group order: a sample whose task (the data's "
        "task column, task_ids) is tasks[i] prefers expert group i. Null: no types, the plain importance balance "
        "CV²(Q).", None,
    )
    group_sizes: list[int] | None = help_field(
        "Experts per group, one entry per task, summing to num_experts (null: num_experts split evenly).", None,
    )
    balance_coef: float = help_field("β, weight of the localized balancing loss added to the LM loss.", 0.1)
    balance_delta: float = help_field(
        "δ in [0, 1): a sample's importance for its own group's experts is weighted 1 + δ, for the others 1 - δ.",
        0.1,
    )
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r) for the experts.", False)
    init: str = help_field(INIT_HELP, "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_rslora")
        self._check_numbers("num_experts", positive=True, integer=True)
        self._check_numbers("balance_coef")
        delta = self.balance_delta
        self._check("balance_delta", is_number(delta) and 0 <= delta < 1, "a number in [0, 1)")
        self._check_task_names()
        if self.group_sizes is not None:
            count = len(self.tasks or [])
            ok = isinstance(self.group_sizes, (list, tuple)) and len(self.group_sizes) == count and all(
                is_int(n, minimum=1) for n in self.group_sizes) and sum(self.group_sizes) == self.num_experts
            self._check("group_sizes", ok, f"null or {count} positive integers (one per task in 'tasks') summing to "
                                           f"num_experts={self.num_experts}")
            self.group_sizes = list(self.group_sizes)
        elif self.tasks is not None and self.num_experts % len(self.tasks):
            raise ConfigError(f"must be set: num_experts={self.num_experts} cannot be split evenly into "
                              f"{len(self.tasks)} groups (one per task in 'tasks'); or change num_experts", "group_sizes")

    def expert_groups(self) -> list[int] | None:
        """The group (index into ``tasks``) of each expert, e.g. [0, 0, 0, 1, 1, 1]; None without tasks."""
        if self.tasks is None:
            return None
        sizes = self.group_sizes or [self.num_experts // len(self.tasks)] * len(self.tasks)
        return [g for g, n in enumerate(sizes) for _ in range(n)]


@dataclass
class HydraLoraConfig(_AdapterSettings):
    """HydraLoRA (Tian et al., NeurIPS 2024, arXiv 2404.19245): an asymmetric LoRA, one shared A and N B heads.

    ``y = W z + s · Σ_i g_i(z) B_i A dropout(z)`` with ``g = softmax(W_g z)`` over the heads (dense: every head
    contributes). A (r × in) is shared by the heads of a projection, each head B_i is (out × r). No auxiliary loss
    (the paper has none). Defaults: r = 8 (the paper's Table 2), 4 heads (the paper's best k, Fig. 8, and the
    authors' script), the FFN projections, alpha 32 and dropout 0.05 (the authors' script).
    """

    kind: ClassVar[str] = "hydralora"

    r: int = help_field("Rank of the shared A and of every B head (the paper: 8).", 8)
    alpha: float = help_field("LoRA alpha; the scale is alpha / r (the authors' script: 32).", 32)
    dropout: float = help_field("Dropout on the input of the shared A (0 allowed; the authors' script: 0.05).", 0.05)
    num_heads: int = help_field(
        "N, the B heads per adapted projection, mixed by the router (the paper: the number of intrinsic "
        "components of the corpus, e.g. found by k-means; its best on Dolly-15K and the authors' script: 4).", 4,
    )
    targets: list[str] | None = help_field(
        "Projections given a HydraLoRA layer, attention and/or FFN, e.g. [gate_proj, up_proj, down_proj] "
        "(null: every FFN projection of the model family, as the authors' script).", None,
    )
    use_rslora: bool = help_field("rsLoRA scaling alpha / sqrt(r).", False)
    init: str = help_field(INIT_HELP + " The router: PyTorch's Linear init (Kaiming-uniform), as the authors'.",
                           "kaiming")
    adapter_dtype: str | None = help_field(ADAPTER_DTYPE_HELP, None)

    def __post_init__(self) -> None:
        self._check_lora()
        self._check_targets("targets")
        self._check_common("use_rslora")
        self._check_numbers("num_heads", positive=True, integer=True)


def implicit_task(tasks: list[str], default: str | None) -> str | None:
    """The MoRE task a call that names none uses: ``default`` when it is one of ``tasks``, else the only task;
    None when there are several and no default. E.g. (["boolq"], None) → "boolq", (["a", "b"], None) → None."""
    if default in tasks:
        return default
    return tasks[0] if len(tasks) == 1 else None


ADAPTER_CONFIGS: dict[str, type] = {c.kind: c for c in (
    LoraConfig, MixLoraConfig, MoreConfig, LoraMoeConfig, HydraLoraConfig, MolaConfig)}
# a training config's ``adapter``, picked by ``kind``
AdapterConfig = LoraConfig | MixLoraConfig | MoreConfig | LoraMoeConfig | HydraLoraConfig | MolaConfig


def adapter_config_from_dict(kind: str, values: dict[str, Any], where: str = "config"):
    """Build the config of adapter ``kind`` ('lora', 'mixlora', ...) from a dict."""
    if kind not in ADAPTER_CONFIGS:
        raise ConfigError(f"{where}: unknown adapter kind '{kind}'; choose one of {sorted(ADAPTER_CONFIGS)}")
    return ADAPTER_CONFIGS[kind].from_dict(values, where)

