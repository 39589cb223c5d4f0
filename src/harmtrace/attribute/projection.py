"""Seeded random projection of per-example gradients.

A gradient ``g`` (all included parameters, flattened) becomes ``P^T g`` with ``P`` a matrix of
independent N(0, 1/k) entries, so that ``E[<P^T a, P^T b>] = <a, b>`` (Johnson-Lindenstrauss).
``P`` is generated one parameter tensor at a time from a seed derived from the projection
seed and the parameter's name, so the same seed always gives the same projection, whatever
the order in which parameters are visited. The whole matrix is held in memory; its size is
``n_params * k * 4`` bytes, checked against ``max_bytes`` before anything is allocated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from harmtrace.errors import ConfigError

__all__ = ["GaussianProjector"]


def _name_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class GaussianProjector:
    """Project flattened parameter gradients to ``dim`` dimensions.

    Parameters
    ----------
    shapes:
        Parameter name -> shape, for the parameters included.
    dim:
        Projection dimension ``k`` (>= 1). ``dim = 0`` keeps gradients unprojected.
    seed:
        Seed of the projection.
    max_bytes:
        Refuse to build a projection larger than this (default 4 GiB).
    """

    def __init__(self, shapes: Mapping[str, torch.Size], *, dim: int, seed: int,
                 max_bytes: int = 4 << 30) -> None:
        if dim < 0:
            raise ConfigError(f"attribute.projection_dim must be >= 0, got {dim}")
        self.names = list(shapes)
        self.numels = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
        self.n_params = sum(self.numels.values())
        self.dim = dim or self.n_params
        self.seed = seed
        self.matrices: dict[str, torch.Tensor] = {}
        if dim == 0:
            return
        need = self.n_params * dim * 4
        if need > max_bytes:
            raise ConfigError(
                f"a projection of {self.n_params:,} parameters to dimension {dim} needs "
                f"{need / 2**30:.1f} GiB; lower attribute.projection_dim or restrict "
                "attribute.parameters to fewer modules"
            )
        for name in self.names:
            gen = torch.Generator().manual_seed(_name_seed(seed, name))
            # (numel, k): column j is the j-th projection direction restricted to this tensor
            self.matrices[name] = torch.randn(self.numels[name], dim, generator=gen) / dim**0.5

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``grads[name]`` has shape ``(B, *shape)``; returns ``(B, dim)``."""
        batch = next(iter(grads.values())).shape[0]
        if not self.matrices:
            return torch.cat([grads[n].reshape(batch, -1) for n in self.names], dim=1)
        out = torch.zeros(batch, self.dim)
        for name in self.names:
            out += grads[name].reshape(batch, -1) @ self.matrices[name]
        return out
