"""Per-example gradients of a causal LM, batched with ``torch.func`` and projected.

The loss of one sequence is the **sum** of token negative log-likelihoods over its target
positions (labels other than -100). Sequences are grouped by exact length, so no padding
is ever added: a sequence's gradient does not depend on the batch it is computed in.
Gradients are taken in eval mode (no dropout); the model's mode is restored afterwards.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.func import functional_call, grad, vmap

from harmtrace.attribute.projection import GaussianProjector
from harmtrace.errors import ConfigError, NumericalError

__all__ = [
    "iter_example_gradients",
    "per_example_gradients",
    "sequence_loss",
    "trainable_parameters",
]


def trainable_parameters(model: torch.nn.Module, include: Sequence[str] = ()) -> dict:
    """Name -> parameter for parameters that require grad (tied weights appear once).

    ``include`` keeps only names containing one of the given substrings; a substring that
    matches no trainable parameter (only frozen ones, or none) is an error naming it, never
    a silent block of zeros or a silently dropped entry.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if isinstance(include, str):
        include = (include,)
    if include:
        for sub in include:
            if any(sub in n for n in params):
                continue
            frozen = [n for n, p in model.named_parameters() if sub in n and not p.requires_grad]
            what = (f"only frozen parameters (requires_grad=False): {frozen[:5]}" if frozen
                    else "no parameter of the model")
            raise ConfigError(
                f"parameters entry {sub!r} matches {what}; name trainable parameters, e.g. "
                f"{list(params)[:5]}, or unfreeze the module to attribute it")
        params = {n: p for n, p in params.items() if any(s in n for s in include)}
    return params


def sequence_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL; ``logits`` (T, V), ``labels`` (T,) with -100 ignored."""
    return torch.nn.functional.cross_entropy(
        logits[:-1], labels[1:], ignore_index=-100, reduction="sum"
    )


def iter_example_gradients(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    projector: GaussianProjector,
    target_masks: Sequence[Sequence[bool]] | None = None,
    batch_size: int = 32,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(rows, grads)``: projected gradients ``(len(rows), projector.dim)`` of
    ``sequences[rows]``, batch by batch, so that callers never hold every gradient at once.

    ``target_masks[i][t]`` (optional) says whether token ``t`` of sequence ``i`` is a target
    of the loss; other tokens (a prompt, or words that carry no harm) are context only. By
    default every token after the first is a target. Only the parameters the projector was
    built for are differentiated; the others enter as constants.
    """
    named = dict(model.named_parameters())
    missing = [n for n in projector.names if n not in named]
    if missing:
        raise ConfigError(f"the projector was built for parameters this model does not have: "
                          f"{missing[:3]}")
    params = {n: named[n].detach() for n in projector.names}
    frozen = {n: p.detach() for n, p in named.items() if n not in params}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    embed_name = _input_embedding_name(model)

    def loss_of(p: dict, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Embedding by hand and passing inputs_embeds keeps transformers' data-dependent
        # padding checks (which vmap cannot trace) out of the graph; a tied output head
        # still receives its gradient through the same tensor.
        weight = p[embed_name] if embed_name in p else frozen[embed_name]
        embeds = torch.nn.functional.embedding(ids, weight).unsqueeze(0)  # (1, T, D)
        out = functional_call(model, (p, frozen, buffers), (), {"inputs_embeds": embeds})
        return sequence_loss(out.logits[0], labels)  # logits (T, V)

    per_example = vmap(grad(loss_of), in_dims=(None, 0, 0))
    groups: dict[int, list[int]] = defaultdict(list)
    for index, seq in enumerate(sequences):
        groups[len(seq)].append(index)
    # switch to eval mode only after every check that can raise, so the caller's mode is
    # always restored
    was_training = model.training
    model.eval()
    try:
        for length in sorted(groups):
            members = groups[length]
            for start in range(0, len(members), batch_size):
                rows = members[start : start + batch_size]
                ids = torch.tensor([list(sequences[i]) for i in rows], dtype=torch.long)
                labels = ids.clone()
                if target_masks is not None:
                    masks = torch.tensor([list(target_masks[i]) for i in rows], dtype=torch.bool)
                    labels = labels.masked_fill(~masks, -100)
                projected = projector.project(per_example(params, ids, labels))
                _check_finite(projected, rows)
                yield rows, projected
    finally:
        model.train(was_training)


def per_example_gradients(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    *,
    projector: GaussianProjector,
    target_masks: Sequence[Sequence[bool]] | None = None,
    batch_size: int = 32,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Projected gradient of each sequence's loss, shape ``(len(sequences), projector.dim)``.

    Row ``i`` belongs to ``sequences[i]`` whatever the grouping used inside; see
    :func:`iter_example_gradients` for ``target_masks``.
    """
    out = torch.zeros(len(sequences), projector.dim)
    for rows, grads in iter_example_gradients(model, sequences, projector=projector,
                                              target_masks=target_masks,
                                              batch_size=batch_size):
        out[rows] = grads
        if on_batch is not None:
            on_batch(len(rows))
    return out


def _input_embedding_name(model: torch.nn.Module) -> str:
    weight = model.get_input_embeddings().weight
    for name, param in model.named_parameters():
        if param is weight:
            return name
    raise ConfigError("the model's input embedding is not among its named parameters")


def _check_finite(values: torch.Tensor, rows: list[int]) -> None:
    bad = ~torch.isfinite(values).all(dim=1)
    if bad.any():
        first = rows[int(bad.nonzero()[0])]
        raise NumericalError(
            f"the gradient of sequence {first} is not finite; check that record for "
            "empty or extreme content and the checkpoint for NaN weights"
        )
