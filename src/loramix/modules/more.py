r"""MoRE: nested low-rank experts on one frozen linear, with a per-task adaptive rank selector.

One LoRA of maximum rank ``R`` holds ``R`` nested experts: expert ``k`` is its first ``k`` rank
components. A selector reads a learned task embedding and picks, per task, which expert to use::

        z ─────────────────────────────► W (frozen) ───────────────────────┐
        │                                                                 (+) ──► y
        └─► dropout ─► A (R×in) ─► h (…, R) ─► × mask_k,t · c² · w · s ─► B (out×R) ┘

        ΔW_k   = s · B[:, :k] diag(c_1², …, c_k²) A[:k, :]          s = alpha / R,  c_i = i / R
        q_t    = softmax(W_g T_emb[t] + b_g)   over the rank set     k_t = rank_set[argmax q_t]
        w_t    = q_t[k_t] − stopgrad(q_t[k_t]) + 1                  (value 1, gradient to W_g, b_g, T_emb)
        y      = W z + w_t · ΔW_{k_t} dropout(z)                     for a sample of task t

A batch may mix tasks: ``z Aᵀ`` gives all ``R`` components of every token in one matmul; a per-sample
mask keeps the first ``k_t`` (times ``c²``, ``w_t`` and ``s``); then one matmul with ``B``.

The task contrastive loss, per module: ``u = normalize(mean of z over a sample's real tokens)``,
``sim = u · normalize(T_emb)ᵀ / τ``, ``L_cl = cross_entropy(sim, t)``. It pulls the module input of a
task's samples towards that task's embedding, so the embedding the selector reads carries the task.

Because ``k_t`` depends on the task only, each task's update can be merged into ``W`` after training
(``delta_weight(task)``): no inference cost. Pure torch; no transformers here.

Inference (no gradient, no active dropout, no autocast, unquantized base: ``FrozenProjection.inference_now``) takes a
lean path, ``MoreLinear.inference_output``: ``W x + b``, ``x Aᵀ`` times each row's kept task coefficients, ``(…) Bᵀ``
added into that fresh output, with Aᵀ, Bᵀ and the coefficients kept while the weights and the selector are unchanged;
the general path's order of operations, so its numbers bit for bit (tests/test_dora_more_inference_path.py). The
contrastive loss is still recorded there unless ``context.inference_only``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoreConfig, implicit_task
from .context import ForwardContext
from .frozen_constant import FrozenConstant
from .kinds import AdapterKind, Site, TensorRole, register, resolve_targets
from .lora import (
    LORA_ROLES, FrozenProjection, LoraDropout, LowRankRows, frozen_linear, in_dtype, lora_factors, lora_input,
    projection_sites,
)
from .quantized import adapter_dtype_for
from .routing import fp32_region


def task_contrastive_loss(
    x: torch.Tensor,
    task_ids: torch.Tensor,
    task_embedding: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
    *,
    normalized_embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """The MoRE task contrastive loss of one module.

    Args:
        x: the module input, shape (B, T, d) (any float dtype; computed in fp32).
        task_ids: (B,) long, the task of each sample.
        task_embedding: (n_tasks, d) task embeddings ``T_emb``.
        temperature: τ.
        valid: (B, T) bool, False on padding, or None when every token is real.
        normalized_embedding: ``normalize_embedding(task_embedding)`` computed beforehand (kept while frozen),
            or None to compute it here.

    Returns:
        Scalar ``cross_entropy(normalize(mean_valid(x)) · normalize(T_emb)ᵀ / τ, task_ids)``.

    Example:
        >>> task_contrastive_loss(torch.randn(2, 5, 8), torch.tensor([0, 1]), torch.randn(3, 8), 0.05)
    """
    if x.dim() == 2:  # (B, d): one vector per sample already
        pooled = x.float()
    elif valid is None:
        pooled = x.float().mean(dim=1)
    else:
        m = valid.to(x.dtype)  # (B, T)
        # (B, 1, T) @ (B, T, d): the masked sum without materialising x * mask; a sample with no real
        # token (never in practice) pools to 0 rather than NaN.
        summed = torch.bmm(m.unsqueeze(1), x).squeeze(1).float()  # (B, d)
        pooled = summed / valid.sum(dim=1, keepdim=True).clamp_min(1).float()
    with fp32_region(pooled.device.type):  # a small fp32 loss, also under autocast
        u = F.normalize(pooled, dim=-1)  # (B, d)
        e = normalize_embedding(task_embedding) if normalized_embedding is None else normalized_embedding
        sim = u @ e.t() / temperature  # (B, n_tasks)
        return F.cross_entropy(sim, task_ids.to(sim.device))


def normalize_embedding(task_embedding: torch.Tensor) -> torch.Tensor:
    """``normalize(T_emb)`` of the contrastive loss in fp32, outside autocast: (n_tasks, d) → (n_tasks, d)."""
    with fp32_region(task_embedding.device.type):
        return F.normalize(task_embedding.float(), dim=-1)


class RankSelector(nn.Module):
    """Per-module task embeddings and the gate choosing one rank (expert) per task.

    Parameters: ``task_embedding`` (num_tasks, in_features), in the module's input space so that the
    contrastive loss can compare it with the pooled input, with a normal init of std ``embedding_std``;
    ``gate``: Linear(in_features → len(ranks)) over the rank set (ascending, e.g. [1, ..., R] or [2, 4, 8]).

    ``frozen``: the authors' released behaviour: the choice is made once by the random initial
    selector; embedding and gate never train and the STE weight is the constant 1.
    """

    def __init__(self, in_features: int, num_tasks: int, ranks: list[int], *, embedding_std: float = 0.01,
                 frozen: bool = False, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.task_embedding = nn.Parameter(torch.empty(num_tasks, in_features, device=device, dtype=dtype))
        nn.init.normal_(self.task_embedding, std=embedding_std)
        self.gate = nn.Linear(in_features, len(ranks), device=device, dtype=dtype)
        self.register_buffer("ranks", torch.tensor(ranks, dtype=torch.long, device=device), persistent=False)
        self.frozen = frozen
        if frozen:
            for p in self.parameters():
                p.requires_grad_(False)

    def probabilities(self) -> torch.Tensor:
        """q, shape (num_tasks, len(ranks)): softmax of the gate over the rank set, per task."""
        # fp32 and outside autocast: the argmax must not depend on the precision of the run, or a
        # task merged/exported in fp32 could pick another rank than the one it was trained with.
        with torch.autocast(self.task_embedding.device.type, enabled=False):
            logits = F.linear(self.task_embedding.float(), self.gate.weight.float(), self.gate.bias.float())
        return torch.softmax(logits, dim=-1)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose per task.

        Returns:
            ranks (num_tasks,) long: the chosen ``k_t``; weights (num_tasks,) float: the
            straight-through weight ``q[k_t] − q[k_t].detach() + 1`` (value exactly 1).
        """
        q = self.probabilities()
        idx = q.argmax(dim=-1)
        if self.frozen:
            return self.ranks[idx], torch.ones(idx.shape, device=idx.device)
        q_chosen = q.gather(-1, idx[:, None]).squeeze(-1)
        return self.ranks[idx], q_chosen - q_chosen.detach() + 1.0


class MoreLinear(FrozenProjection):
    """A frozen linear projection plus MoRE's nested low-rank experts chosen per task.

    ``base``, ``fan_in_fan_out`` and ``context`` as for ``FrozenProjection``; ``config`` the ``MoreConfig``,
    with its tasks named.

    Shapes: input (B, ..., in) → output (B, ..., out); the task ids (B,) come from ``context.task_ids``.
    A forward records this module's scalar task contrastive loss (``contrastive_loss``) in ``context.losses``.
    """

    def __init__(self, base: nn.Module, config: MoreConfig, *, fan_in_fan_out: bool = False,
                 context: ForwardContext | None = None) -> None:
        super().__init__(base, fan_in_fan_out, context)
        max_rank = self.max_rank = config.max_rank
        tasks = config.named_tasks()
        self.num_tasks = len(tasks)
        self.scale = config.scale
        self.temperature = config.temperature
        self.selector_kind = config.selector
        task = implicit_task(tasks, config.default_task)  # default_task, else the only task, else None
        self.default_task = None if task is None else tasks.index(task)
        self.dropout = LoraDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Adapter tensors stay fp32 when the base is half precision or quantized (as LoraLinear does).
        factory = {"device": self.weight.device, "dtype": adapter_dtype_for(base, config.adapter_dtype)}
        self.lora_A, self.lora_B = lora_factors(max_rank, self.in_features, self.out_features, init=config.init,
                                                **factory)
        self.selector = RankSelector(self.in_features, self.num_tasks, config.rank_set, **factory,
                                     embedding_std=config.task_embedding_std, frozen=config.selector == "frozen_random")
        i = torch.arange(1, max_rank + 1, device=self.weight.device, dtype=torch.float32)
        # c_i² per component: c_i multiplies both the A row and the B column of component i.
        c2 = (i / max_rank) ** 2 if config.linear_scaling else torch.ones_like(i)
        self.register_buffer("component_scale", c2, persistent=False)
        self._fixed_ranks: torch.Tensor | None = None  # (num_tasks,) once fix_ranks() ran
        self._task_coefficients = FrozenConstant()  # (num_tasks, R), kept while the selector is frozen
        self._has_dropout = type(self.dropout) is not nn.Identity
        self._inference_factors = FrozenConstant()  # (Aᵀ, Bᵀ, task coefficients) of ``inference_output``
        self._normalized_embedding = FrozenConstant()  # the contrastive loss's normalize(T_emb)

    # ------------------------------------------------------------------------------ task choice
    @property
    def ranks(self) -> list[int]:
        """The rank set."""
        return self.selector.ranks.tolist()

    def choose(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per task: chosen rank ``k_t`` (num_tasks,) long and STE weight (num_tasks,) (value 1).

        With ranks fixed (``fix_ranks``, eval mode) the selector is skipped and the weight is 1.
        """
        if self._fixed_ranks is not None and not self.training:
            return self._fixed_ranks, torch.ones(self.num_tasks, device=self._fixed_ranks.device)
        return self.selector()

    def chosen_ranks(self) -> list[int]:
        """The rank each task uses now, e.g. [4, 8, 2] for three tasks."""
        with torch.no_grad():
            return self.choose()[0].tolist()

    def fix_ranks(self) -> list[int]:
        """Cache the current choice per task so evaluation skips the selector; cleared by ``train()``."""
        with torch.no_grad():
            self._fixed_ranks = self.selector()[0].clone()
        return self._fixed_ranks.tolist()

    def train(self, mode: bool = True) -> "MoreLinear":
        if mode:
            self._fixed_ranks = None  # the selector may move again
        return super().train(mode)

    def task_ids_for(self, batch: int, device: torch.device) -> torch.Tensor:
        """The (batch,) task ids of this forward, from the context or the default task."""
        ids = self.context.task_ids
        if ids is None:
            default = self.context.default_task_id
            default = self.default_task if default is None else default
            if default is None:
                raise ValueError(
                    "this MoRE model needs the task of every sample: call model(..., task_ids=LongTensor[batch]) "
                    "with indices into the adapter's task list, use loramix.adapters.more_tasks.use_task(model, name), "
                    "or set 'default_task' in the MoRE config. Under transformers Trainer or TRL SFTTrainer: give the "
                    "dataset a 'task' (name) or 'task_ids' column, set remove_unused_columns=False and pass "
                    "data_collator=loramix.integrations.hf.TaskCollator(<your collator>, tasks=model)"
                )
            return torch.full((batch,), int(default), dtype=torch.long, device=device)
        # Every MoRE module of the model sees the same task_ids object in one forward: convert and
        # check it once (the range check is a host sync, which on a GPU should not happen per module).
        cached = self.context.checked_task_ids
        key = (batch, device, getattr(ids, "_version", None))  # _version: in-place edits invalidate
        if cached is not None and cached[0] is ids and cached[1] == key:
            return cached[2]
        original = ids
        ids = torch.as_tensor(ids, device=device).long().reshape(-1)
        if ids.numel() == 1 and batch != 1:
            ids = ids.expand(batch)  # one task for the whole batch (also after beam expansion)
        if ids.numel() != batch:
            raise ValueError(f"task_ids has {ids.numel()} entries but the batch has {batch} samples")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_tasks):
            raise ValueError(f"task_ids must lie in [0, {self.num_tasks}), got {ids.tolist()}")
        self.context.checked_task_ids = (original, key, ids)
        return ids

    # ---------------------------------------------------------------------------------- math
    def delta_weight(self, task: int) -> torch.Tensor:
        """``ΔW_{k_t} = s · B[:, :k] diag(c²_1..c²_k) A[:k]`` for task index ``task``, shape (out, in), fp32."""
        A, B = self.task_factors(task)
        return B @ A

    def task_factors(self, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The task's update as a plain LoRA: A (k, in) and B (out, k) with ``s · c²`` folded into B."""
        k = self.chosen_ranks()[task]
        with torch.no_grad():
            A = self.lora_A[:k].float()
            B = self.lora_B[:, :k].float() * (self.scale * self.component_scale[:k])[None, :]
        return A.clone(), B.clone()

    def adapter_forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Adapted output given the frozen output ``base_out = W x + b`` (both (B, ..., in/out)); the
        context's task ids and token mask are those of these B rows (``AdapterStack`` computes the
        frozen output once for the rows of several adapters)."""
        if x.dim() > 1 and x.dtype == base_out.dtype and self.inference_now(base_out.device.type):
            return self.inference_output(x, base_out, in_place=False)
        batch = x.shape[0]
        task_ids = self.task_ids_for(batch, x.device)  # (B,)
        # The LoRA branch runs in the frozen output's dtype (the autocast dtype under autocast), as in
        # LoraLinear: the small factors are cast to it, the output keeps it.
        compute = base_out.dtype
        x_in, factor = lora_input(self.dropout, in_dtype(x, compute))  # LoRA's dropout; its 1/(1-p) goes into coef
        coef = self.task_coefficients(self.scale * factor, x.device, compute)[task_ids]  # (B, R)
        coef = coef.reshape(batch, *([1] * (x.dim() - 2)), self.max_rank)
        if not self.context.inference_only:
            # coef is small and on the output's path: it carries the loss's gradient through a reentrant
            # checkpoint's recompute (modules/auxiliary.py)
            coef = self.context.losses.record(self, coef, {"contrastive_loss": self._contrastive_loss(x, task_ids)})
        A, B = in_dtype(self.lora_A, compute), in_dtype(self.lora_B, compute)
        return base_out + F.linear(F.linear(x_in, A) * coef, B)  # x_in Aᵀ: all R components in one matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W x + b + (x Aᵀ ⊙ coef[task]) Bᵀ`` (see the module docstring); ``W x + b`` while the context disables
        adapters. Shapes: (B, ..., in) → (B, ..., out).

        Inference (``inference_now``: serving, evaluation, ``generate``) takes a lean path with the general one's
        numbers: ``F.linear(x, W, b)``, ``x Aᵀ`` times the rows' kept coefficients, and ``(…) Bᵀ`` added into that
        fresh frozen output, without per-call casts, checks or temporaries beyond those.
        """
        if x.dim() > 1 and self.inference_now(x.device.type) and not self.context.disabled:
            params = self._parameters
            out = frozen_linear(x, params["weight"], params.get("bias"), self.fan_in_fan_out)
            return self.inference_output(x, out, in_place=True)
        return super().forward(x)

    def inference_output(self, x: torch.Tensor, base_out: torch.Tensor, *, in_place: bool) -> torch.Tensor:
        """The inference path's ``base_out + (x Aᵀ ⊙ coef) Bᵀ``, in ``adapter_forward``'s order of operations (so its
        roundings, bit for bit): x (B, ..., in) and base_out ``W x + b`` (B, ..., out) in the same dtype; each row's
        coefficients are its task's ``task_coefficients`` row. ``in_place``: written into ``base_out``, which must be
        the caller's own contiguous tensor. Records the contrastive loss as ``adapter_forward`` does (unless
        ``context.inference_only``)."""
        dtype, device, batch = x.dtype, x.device, x.shape[0]
        params = self._parameters
        A, B = params["lora_A"], params["lora_B"]
        tensors, settings = self.coefficient_inputs()

        def compute() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            At, Bt = in_dtype(A.detach(), dtype).t(), in_dtype(B.detach(), dtype).t()
            return At, Bt, self.task_coefficients(self.scale, device, dtype)

        # one kept tuple for the factors and the (num_tasks, R) coefficients: one key check per call
        At, Bt, table = self._inference_factors.get((A, B) + tensors, compute, settings + (device, dtype))
        context = self.context
        default = context.default_task_id if context.default_task_id is not None else self.default_task
        if context.task_ids is None and default is not None and context.inference_only:
            coef = table[int(default)]  # (R,): every row's, broadcast
        else:
            task_ids = self.task_ids_for(batch, device)  # the task or the error of the general path
            coef = table[task_ids].view(batch, *([1] * (x.dim() - 2)), self.max_rank)  # (B, 1.., R)
            if not context.inference_only:  # without a gradient: only recorded, coef is returned unchanged
                context.losses.record(self, coef, {"contrastive_loss": self._contrastive_loss(x, task_ids)})
        low = torch.mm(x.reshape(-1, x.shape[-1]), At)  # (rows, R): x Aᵀ, all R components
        low.view(*x.shape[:-1], self.max_rank).mul_(coef)
        term = torch.mm(low, Bt)  # (rows, out)
        if in_place:
            return base_out.view(-1, base_out.shape[-1]).add_(term).view(base_out.shape)
        return base_out + term.view(base_out.shape)

    def low_rank_rows(self, rows: int, dtype: torch.dtype) -> LowRankRows | None:
        """This adapter as ``LowRankRows`` for ``rows`` rows (the context's task ids are theirs) in ``dtype``: each
        row's coefficients are its task's; None while dropout is active."""
        if self.training and type(self.dropout) is not nn.Identity:
            return None
        device = self.lora_A.device
        coefficients = self.task_coefficients(self.scale, device, dtype)[self.task_ids_for(rows, device)]
        return LowRankRows(in_dtype(self.lora_A, dtype), in_dtype(self.lora_B, dtype), coefficients)

    def task_coefficients(self, scale: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Per task, what multiplies each of the R components: ``[i < k_t] · c_i² · w_t · scale``, shape
        (num_tasks, R), in ``dtype`` on ``device``; ``scale`` is s times the dropout's 1/(1-p).

        Kept while the selector's tensors (and fixed ranks) are unchanged and need no gradient (serving,
        evaluation; ``FrozenConstant``): then a forward only indexes it by its rows' tasks."""
        use_fixed = self._fixed_ranks is not None and not self.training

        def compute() -> torch.Tensor:
            k, w = self.choose()
            k, w = k.to(device), w.to(device)
            positions = torch.arange(self.max_rank, device=device)
            return ((positions[None, :] < k[:, None]) * self.component_scale[None, :] * (w[:, None] * scale)).to(dtype)

        tensors, settings = self.coefficient_inputs()
        return self._task_coefficients.get(tensors, compute, extra=settings + (scale, device, dtype))

    def coefficient_inputs(self) -> tuple[tuple[torch.Tensor, ...], tuple[bool, bool]]:
        """What ``task_coefficients`` reads besides its arguments: the selector's tensors, ``component_scale`` and the
        fixed ranks while they are used; and (whether they are, whether the selector is frozen). Read from the
        modules' own dictionaries: the inference path asks on every call."""
        use_fixed = self._fixed_ranks is not None and not self.training
        selector = self._modules["selector"]
        gate = selector._modules["gate"]
        tensors = (selector._parameters["task_embedding"], gate._parameters["weight"], gate._parameters["bias"],
                   selector._buffers["ranks"], self._buffers["component_scale"])
        return tensors + ((self._fixed_ranks,) if use_fixed else ()), (use_fixed, selector.frozen)

    def _contrastive_loss(self, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """This module's task contrastive loss for input x (B, ..., in) and task ids (B,), a scalar."""
        batch = x.shape[0]
        flat = self.context.valid_tokens(batch, x.shape[1]) if x.dim() == 3 else None
        valid = None if flat is None else flat.reshape(batch, x.shape[1])
        param = emb = self.selector.task_embedding
        if self.selector.frozen:
            # frozen_random: nothing may move the embedding the frozen choice was read from, even if a
            # trainer re-enables its gradient; the contrastive loss then only shapes the module inputs.
            emb = emb.detach()
        normalized = self._normalized_embedding.get((param,), lambda: normalize_embedding(emb))
        return task_contrastive_loss(x, task_ids, emb, self.temperature, valid, normalized_embedding=normalized)

    # The adapter tensors relative to the module, known without one (a file's expected keys); frozen_random
    # saves its selector too.
    TENSOR_NAMES = ("lora_A", "lora_B", "selector.task_embedding", "selector.gate.weight", "selector.gate.bias")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, max_rank={self.max_rank}, ranks={self.ranks}, "
                f"tasks={self.num_tasks}, scale={self.scale:g}, selector={self.selector_kind}")


def more_modules(model: nn.Module) -> dict[str, MoreLinear]:
    """The model's MoRE projections by module path (e.g. ``model.layers.0.self_attn.q_proj``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoreLinear)}


# ============================================================================================ the kind
class MoreKind(AdapterKind):
    """MoRE: a ``MoreLinear`` on each targeted projection; one update per task (merged and exported per task)."""

    name, title, config_class = "more", "MoRE", MoreConfig
    # A and B of rank R = max_rank, then the selector: task embeddings (T, in), gate (K, in) and (K,)
    roles = (*LORA_ROLES[:2], TensorRole("task_embedding", r"selector\.task_embedding", ("T", None), ("", "in")),
             TensorRole("gate_w", r"selector\.gate\.weight", ("K", None), ("", "in")),
             TensorRole("gate_b", r"selector\.gate\.bias", ("K",), ("",)))
    size_settings = ("max_rank", "num_tasks")
    rank_setting = "max_rank"
    auxiliary_losses = {"contrastive_loss": "contrastive_coef"}
    per_task = True
    merge_refusal = ("a MoRE adapter holds one update per task; merge one task with "
                     "loramix.adapters.more_tasks.merge_task(model, task) (CLI: loramix merge --task NAME)")
    export_refusals = {
        "peft": "a MoRE adapter exports one task at a time: give --task NAME",
        "merged": "a MoRE adapter holds one update per task: merge one task with --task NAME",
        "mixtral": "format 'mixtral' exports MixLoRA adapters; this is a MoRE adapter "
                   "(use --format peft or --format merged with --task)",
    }
    peft_type = ("LORAMIX_MORE (a loramix MoRE adapter, not a PEFT one: load it with loramix.load_adapter, or write "
                 "one task as a PEFT LoRA with `loramix export ADAPTER --format peft --task NAME --out DIR`)")

    def check(self, config: MoreConfig) -> None:
        config.named_tasks()

    def sites(self, config: MoreConfig, family) -> list[Site]:
        blocks = {family.attention: family.attention_projections, family.ffn: family.ffn_projections}

        def build(base: nn.Module, context: ForwardContext) -> MoreLinear:
            return MoreLinear(base, config, fan_in_fan_out=family.fan_in_fan_out, context=context)

        def elements(n_in: int, n_out: int) -> tuple[int, str | None]:
            tasks, ranks = len(config.named_tasks()), len(config.rank_set)
            return config.max_rank * (n_in + n_out) + tasks * n_in + ranks * (n_in + 1), config.adapter_dtype

        chosen = resolve_targets(config.targets, blocks, "targets", family)
        return projection_sites(chosen, list(MoreLinear.TENSOR_NAMES), build, elements, family.fan_in_fan_out)

    def sizes(self, config: MoreConfig, family, module: str) -> dict[str, tuple[str, int]]:
        return {"R": ("max_rank", config.max_rank), "T": ("tasks", len(config.tasks or [])),
                "K": ("ranks", len(config.rank_set))}

    def tasks(self, config: MoreConfig) -> list[str]:
        return list(config.tasks or [])


register(MoreKind())
