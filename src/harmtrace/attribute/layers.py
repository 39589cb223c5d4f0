"""Per-example gradients of linear layers, read from forward and backward hooks.

Influence functions (EK-FAC, K-FAC) and gradient projection (LoGra) never need a whole
parameter gradient: for a linear layer ``y = W a + b`` the gradient of one example's loss is
the outer product ``G = sum_t g_t a_t^T`` of the layer's output gradients ``g_t`` and input
activations ``a_t`` over its tokens ``t``. This module captures ``(a, g)`` per tracked
module for one batch; callers build factors, projections or gradients from them.

Supported modules are ``torch.nn.Linear`` (weight ``(d_out, d_in)``) and GPT-2's
``transformers.pytorch_utils.Conv1D`` (weight ``(d_in, d_out)``, ``y = x @ W + b``). Every
gradient matrix here is in the **canonical layout** ``(d_out, d_in')``, whatever the module
type, where ``d_in' = d_in + 1`` when the module has a bias (a constant 1 is appended to the
activations, so the last column is the bias gradient) and ``d_in' = d_in`` otherwise.

Conventions:

* the loss differentiated is ``task.train_loss`` (or the query / sampled loss) **summed**
  over the batch; since every example's loss is its own (see
  :mod:`harmtrace.attribute.task`), each example's ``g`` is the gradient of its own loss,
  independent of the batch it is in;
* gradients are taken in eval mode (no dropout, batch norm uses running statistics); the
  model's train/eval flags are restored afterwards, its weights, buffers and ``.grad``
  fields are never written (output gradients come from ``torch.autograd.grad``);
* a module called several times in one forward pass (weight sharing) has its calls
  concatenated along the token axis, so its gradient is the sum over all its uses.

Typical use::

    modules = tracked_modules(model)
    with GradientCapture(model, modules) as cap:
        captured = cap.run(task, batch)          # name -> Captured(a, g, mask)
    grads = per_example_gradients(model, task, batch, modules)  # name -> (B, d_out, d_in')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from harmtrace.attribute.task import batch_size_of, per_example
from harmtrace.errors import ConfigError, NumericalError

try:  # transformers is a core dependency, but keep the module importable without it
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - only without transformers
    Conv1D = None

__all__ = [
    "Captured",
    "GradientCapture",
    "LossKind",
    "ModuleInfo",
    "capture_batch",
    "eval_mode",
    "module_info",
    "per_example_gradients",
    "tracked_modules",
]

#: Which loss of the task is differentiated: the train loss, the query loss (the measured
#: behaviour) or the train loss against targets sampled from the model (true Fisher).
LossKind = Literal["train", "query", "sampled"]


def _supported(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return Conv1D is not None and isinstance(module, Conv1D)


@dataclass(frozen=True)
class ModuleInfo:
    """Shape of a tracked module's gradient in the canonical layout ``(d_out, d_in')``.

    ``has_bias`` is True when the module has a **trainable** bias: a frozen bias is not
    attributed (only parameters that require grad are), so it gets no gradient column.
    """

    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool  # True for Conv1D, whose weight is stored (d_in, d_out)

    @property
    def d_in_aug(self) -> int:
        """``d_in + 1`` with a bias (the last column of the gradient), else ``d_in``."""
        return self.d_in + int(self.has_bias)

    @property
    def n_params(self) -> int:
        return self.d_out * self.d_in_aug


def module_info(module: torch.nn.Module) -> ModuleInfo:
    """The :class:`ModuleInfo` of a ``Linear`` or ``Conv1D`` module."""
    bias = getattr(module, "bias", None)
    trainable_bias = bias is not None and bias.requires_grad
    if isinstance(module, torch.nn.Linear):
        return ModuleInfo(module.in_features, module.out_features, trainable_bias, False)
    if Conv1D is not None and isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return ModuleInfo(int(d_in), int(d_out), trainable_bias, True)
    raise ConfigError(f"module of type {type(module).__name__} is not supported; only "
                      f"torch.nn.Linear and transformers' Conv1D are")


def tracked_modules(model: torch.nn.Module, include: Sequence[str] = ()) -> list[str]:
    """Names of the trainable ``Linear`` / ``Conv1D`` modules of ``model``, in model order.

    A module is trainable when its weight requires grad (its bias counts only when it
    requires grad too, see :class:`ModuleInfo`). ``include`` keeps only names that
    contain one of the given substrings; a substring that matches no trainable supported
    module raises :class:`ConfigError` listing what it matched (frozen or unsupported
    modules) and what can be named.

    Tied weights are counted once: a module whose weight is the same tensor as an earlier
    tracked module's is dropped, and a ``Linear`` whose weight is shared with a module this
    engine cannot track (the output head tied to the input embedding) is left out, since its
    hook gradient would miss the embedding's share of the parameter's gradient. Naming such
    a module explicitly is an error rather than a silently partial gradient.
    """
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if pname == "weight":
                owners.setdefault(id(param), []).append(name)
    modules = dict(model.named_modules())

    def tied_to_untracked(name: str) -> bool:
        shared = owners.get(id(modules[name].weight), [])
        return any(not _supported(modules[o]) for o in shared)

    chosen: list[str] = []
    seen: set[int] = set()
    skipped_tied: list[str] = []
    for name, module in modules.items():
        if not _supported(module) or not module.weight.requires_grad:
            continue
        if id(module.weight) in seen or tied_to_untracked(name):
            skipped_tied.append(name)
            continue
        seen.add(id(module.weight))
        chosen.append(name)

    if not include:
        if not chosen:
            raise ConfigError("the model has no trainable torch.nn.Linear or Conv1D module; "
                              "influence functions need at least one")
        return chosen
    kept = [n for n in chosen if any(s in n for s in include)]
    for sub in include:
        if any(sub in n for n in kept):
            continue
        hits = [n for n in modules if n and sub in n]
        why = []
        for n in hits[:5]:
            m = modules[n]
            if n in skipped_tied:
                why.append(f"{n} (weight tied to an embedding or an earlier module)")
            elif not _supported(m):
                why.append(f"{n} ({type(m).__name__}: not Linear/Conv1D)")
            elif not m.weight.requires_grad:
                why.append(f"{n} (frozen: requires_grad=False)")
        raise ConfigError(
            f"modules include entry {sub!r} matches no trainable Linear/Conv1D module"
            f"{'; it matched ' + ', '.join(why) if why else ''}; trackable modules are "
            f"{chosen[:8]}{'...' if len(chosen) > 8 else ''}"
        )
    return kept


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode; restore every submodule's own train/eval flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@dataclass
class Captured:
    """What one tracked module saw during one batch.

    ``a``: input activations ``(B, T, d_in')`` with the constant-1 bias column appended when
    the module has a bias (``T = 1`` for a non-sequence input ``(B, d_in)``; several calls
    are concatenated along ``T``). ``g``: gradients of the summed per-example losses with
    respect to the module's output, ``(B, T, d_out)``. ``mask``: ``(B, T)`` float, 1 at real
    tokens and 0 at padding (from ``batch["attention_mask"]`` when its shape matches, else
    all ones); padding has ``g = 0`` but its activations must be left out of covariances.
    Tensors keep the model's dtype and are detached.
    """

    a: torch.Tensor
    g: torch.Tensor
    mask: torch.Tensor

    def gradient(self) -> torch.Tensor:
        """Per-example gradient matrices ``(B, d_out, d_in')``: ``sum_t g_t a_t^T``."""
        return torch.einsum("bto,bti->boi", self.g, self.a)


class GradientCapture:
    """Hooks that keep ``(a, g)`` of the named modules for one forward/backward pass.

    Use as a context manager (hooks are removed on exit) and call :meth:`run` once per
    batch. Only forward hooks are registered: each keeps its input and its output tensor,
    and :meth:`run` asks ``torch.autograd.grad`` for the gradients of the outputs, so no
    parameter's ``.grad`` is touched and frozen parameters elsewhere are fine.
    """

    def __init__(self, model: torch.nn.Module, names: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise ConfigError(f"model has no module named {unknown[:3]}; use "
                              f"tracked_modules(model) for the names")
        self.model = model
        self.names = list(names)
        self.modules = {n: modules[n] for n in self.names}
        self.info = {n: module_info(m) for n, m in self.modules.items()}
        self._handles: list = []
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._outputs: dict[str, list[torch.Tensor]] = {}

    def __enter__(self) -> GradientCapture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._outputs.clear()

    def _hook(self, name: str):
        def keep(module, inputs, output):
            self._inputs[name].append(inputs[0].detach())
            self._outputs[name].append(output)
        return keep

    def run(self, task, batch: dict, *, loss: LossKind = "train",
            generator: torch.Generator | None = None,
            rows: Sequence[int] | None = None) -> dict[str, Captured]:
        """Forward and backward ``batch`` once; return ``name -> Captured`` in name order.

        ``loss`` picks ``task.train_loss``, ``task.query_loss`` or ``task.sampled_loss``
        (which needs ``generator``). ``rows`` (optional) are the record indices of the
        batch's rows, used to name records in errors. The caller sets the mode (see
        :func:`eval_mode`). A non-finite loss raises :class:`NumericalError`.
        """
        if not self._handles:
            raise ConfigError("GradientCapture.run must be called inside 'with'")
        self._inputs = {n: [] for n in self.names}
        self._outputs = {n: [] for n in self.names}
        with torch.enable_grad():
            losses = _loss(task, self.model, batch, loss, generator)  # (B,)
            if not torch.isfinite(losses).all():
                bad = torch.nonzero(~torch.isfinite(losses))[:, 0].tolist()
                where = (f"records {[rows[i] for i in bad[:5]]}" if rows is not None
                         else f"batch rows {bad[:5]}")
                raise NumericalError(f"non-finite {loss} loss at {where}; check those "
                                     f"inputs and the model's weights")
            outputs = [o for n in self.names for o in self._outputs[n]]
            missing = [n for n in self.names if not self._outputs[n]]
            if missing:
                raise ConfigError(f"modules {missing[:3]} were not called by the forward "
                                  f"pass; leave them out of the modules list")
            grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        batch_size = losses.shape[0]
        result: dict[str, Captured] = {}
        k = 0
        for name in self.names:
            a_parts, g_parts = [], []
            for a, out in zip(self._inputs[name], self._outputs[name], strict=True):
                g = grads[k] if grads[k] is not None else torch.zeros_like(out)
                k += 1
                a_parts.append(_as_btd(a, batch_size, name))  # (B, T_call, d_in)
                g_parts.append(_as_btd(g.detach(), batch_size, name))  # (B, T_call, d_out)
            a = torch.cat(a_parts, dim=1)
            g = torch.cat(g_parts, dim=1)
            if self.info[name].has_bias:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)  # (B, T, d_in + 1)
            result[name] = Captured(a, g, _token_mask(batch, a_parts, batch_size))
        self._inputs = {n: [] for n in self.names}
        self._outputs = {n: [] for n in self.names}
        return result


def _loss(task, model, batch, kind: str, generator) -> torch.Tensor:
    if kind == "train":
        out = task.train_loss(model, batch)
    elif kind == "query":
        out = task.query_loss(model, batch)
    elif kind == "sampled":
        if generator is None:
            raise ConfigError("loss='sampled' needs a torch.Generator for the targets")
        out = task.sampled_loss(model, batch, generator)
    else:
        raise ConfigError(f"loss must be 'train', 'query' or 'sampled', got {kind!r}")
    return per_example(out, batch, what=f"the task's {kind} loss")


def _as_btd(x: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """``x`` as ``(B, T, d)``: ``(B, d)`` gets ``T = 1``, extra middle axes are flattened."""
    if x.dim() < 2 or x.shape[0] != batch_size:
        raise ConfigError(f"module {name} saw a tensor of shape {tuple(x.shape)} whose first "
                          f"axis is not the batch ({batch_size}); only batch-first layers "
                          f"are supported")
    if x.dim() == 2:
        return x[:, None, :]
    return x.reshape(batch_size, -1, x.shape[-1])


def _token_mask(batch: dict, a_parts: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    masks = []
    attn = batch.get("attention_mask") if isinstance(batch, dict) else None
    for a in a_parts:
        width = a.shape[1]  # a is (B, T_call, d_in)
        if attn is not None and tuple(attn.shape) == (batch_size, width):
            masks.append(attn.to(torch.float64))
        else:
            masks.append(torch.ones(batch_size, width, dtype=torch.float64, device=a.device))
    return torch.cat(masks, dim=1)


def _check_user_batch(task, batch: dict) -> None:
    """The task's own checks of a batch built by the caller (padding labels, ...)."""
    size = batch_size_of(batch)
    if hasattr(task, "check_batch") and size is not None:
        task.check_batch(batch, list(range(size)))


def capture_batch(model: torch.nn.Module, task, batch: dict, names: Sequence[str], *,
                  loss: LossKind = "train",
                  generator: torch.Generator | None = None) -> dict[str, Captured]:
    """``(a, g, mask)`` of each module in ``names`` for one batch, in eval mode.

    The model's train/eval flags are restored afterwards and its weights are not written.
    See :class:`Captured` for the shapes.
    """
    _check_user_batch(task, batch)
    with eval_mode(model), GradientCapture(model, names) as cap:
        return cap.run(task, batch, loss=loss, generator=generator)


def per_example_gradients(model: torch.nn.Module, task, batch: dict, names: Sequence[str],
                          *, loss: LossKind = "train",
                          generator: torch.Generator | None = None,
                          dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """Name -> per-example gradient matrices ``(B, d_out, d_in')`` in ``dtype``.

    ``grads[name][b]`` is the gradient of example ``b``'s own loss with respect to the
    module's weight in the canonical layout (for ``Conv1D``, the transpose of its stored
    weight's gradient), the bias gradient as the last column when the module has one.
    """
    captured = capture_batch(model, task, batch, names, loss=loss, generator=generator)
    return {n: torch.einsum("bto,bti->boi", c.g.to(dtype), c.a.to(dtype))
            for n, c in captured.items()}
