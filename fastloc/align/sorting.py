"""Differentiable sorting networks: the relaxed permutation matrix of Petersen et al.'s diffsort.

NeCo (NECO-AND-GRAM.md A3) soft-sorts each query cell's 49 similarities with diffsort's
``DiffSortNet('bitonic', 49, steepness)`` and trains on the permutation matrix it returns. This is
the same network and relaxation (Felix-Petersen/diffsort @ 5c417ea, networks.py and functional.py;
tests/test_neco_ops.py compares values and gradients with a transcription of them), written without
the reference's 0/1 selection matmuls: each layer gathers the two wires of every comparator, mixes
them and the running permutation matrix with the comparator's relaxed swap weight. The layers are
built once per (n, network, device) and cached; the sort runs in fp32 at least.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import Tensor

NETWORKS = ("bitonic", "odd_even")

# alpha(v), v = steepness * (b - a): the weight of wire a in the comparator's minimum
# (functional.py 44-68; logistic_phi and optimal are not carried).
RELAXATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "cauchy": lambda v: torch.atan(v) * (1 / math.pi) + 0.5,
    "logistic": torch.sigmoid,
    "gaussian": lambda v: 0.5 + 0.5 * torch.erf(v * (1 / math.sqrt(2))),
    "reciprocal": lambda v: 0.5 * (v / (2 + v.abs()) + 1),
}


def _bitonic_layers(n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """diffsort's bitonic network (networks.py 6-52) on 2**ceil(log2 n) wires whose top 2**k - n
    are discarded: a comparator touching a discarded wire leaves its other wire where it is."""
    blocks = math.ceil(math.log2(n)) if n > 1 else 0
    pad = 2**blocks - n
    wire = np.arange(2**blocks)
    layers = []
    for block in range(blocks):
        for layer in range(block + 1):
            m = 2 ** (block - layer)
            a = wire & ~m  # the comparator's upper wire (the reference's ix), b = a + m its lower one
            b = a + m
            flip = (a >> (block + 1)) & 1 == 1  # descending half of the bitonic merge: the min goes to b
            takes_min = (wire == a) != flip
            real = (a >= pad) & (b >= pad)
            keep = wire[wire >= pad]  # the n real wires, renumbered from 0
            lo = np.where(real[keep], a[keep], keep) - pad
            hi = np.where(real[keep], b[keep], keep) - pad
            layers.append((lo, hi, takes_min[keep]))
    return layers


def _odd_even_layers(n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """diffsort's odd-even transposition network (networks.py 55-107): n layers of neighbour
    comparators (i, i + 1) from i = 0, then from i = 1; unpaired end wires stay where they are."""
    wire = np.arange(n)
    layers = []
    for layer in range(n):
        first = (wire - layer % 2) % 2 == 0  # the upper wire of a pair in this layer
        a = np.where(first, wire, wire - 1)
        real = (a >= 0) & (a + 1 < n)
        lo = np.where(real, a, wire)
        hi = np.where(real, a + 1, wire)
        layers.append((lo, hi, first))
    return layers


@cache
def _network(n: int, network: str, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The layers as [L, n] tensors on ``device``: each output wire c of layer l is mixed from wires
    lo[l, c] and hi[l, c] (equal for a wire that passes through) and takes the minimum iff takes_min."""
    layers = _bitonic_layers(n) if network == "bitonic" else _odd_even_layers(n)
    with torch.inference_mode(False):  # cached: a first call under inference_mode must not make them inference tensors
        if not layers:  # n == 1: nothing to compare
            return tuple(torch.empty(0, n, dtype=t, device=device) for t in (torch.long, torch.long, torch.bool))
        return tuple(torch.from_numpy(np.stack(column)).to(device) for column in zip(*layers))


def soft_sort_permutation(x: Tensor, steepness: float, network: str = "bitonic", relaxation: str = "cauchy") -> Tensor:
    """diffsort's relaxed permutation matrix (``DiffSortNet(network, n, steepness=...)(x)[1]``).

    x [N, n], sorted in fp32 (fp64 stays fp64). Returns P [N, n, n] in that dtype: P[k, i, c] = the
    weight of x[k, i] at sorted position c (ascending); doubly stochastic; x[k] @ P[k] is the soft-sorted
    row (diffsort's first output). network: ``bitonic`` (padded to a power of two as diffsort does) or
    ``odd_even``; relaxation: ``cauchy`` (diffsort's default, NeCo's), ``logistic``, ``gaussian`` or
    ``reciprocal``.
    """
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"soft_sort_permutation: x must be [N, n] with n >= 1, got shape {tuple(x.shape)}")
    if network not in NETWORKS:
        raise ValueError(f"soft_sort_permutation: network must be one of {NETWORKS}, got {network!r}")
    if relaxation not in RELAXATIONS:
        raise ValueError(f"soft_sort_permutation: relaxation must be one of {tuple(RELAXATIONS)}, got {relaxation!r}")
    if not (math.isfinite(steepness) and steepness > 0):
        raise ValueError(f"soft_sort_permutation: steepness must be a positive finite number, got {steepness}")
    rows, n = x.shape
    relax = RELAXATIONS[relaxation]
    lo, hi, takes_min = _network(n, network, x.device)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 / fp16 sort in fp32 (pitfall A6)
    # Y = P^T, [N, position, element]: a layer gathers whole rows (contiguous) rather than columns.
    y = torch.eye(n, dtype=x.dtype, device=x.device).expand(rows, n, n)
    for layer in range(lo.shape[0]):
        a, b = x[:, lo[layer]], x[:, hi[layer]]  # [N, n]: each output wire's comparator inputs
        alpha = relax(steepness * (b - a))  # the weight of a in the minimum (functional.py 60-63)
        weight = torch.where(takes_min[layer], alpha, 1 - alpha)  # [N, n]: the weight of a at this wire
        x = b + weight * (a - b)
        # One saved [N, n, n] tensor per layer (the difference, made in place), not two.
        y_hi = y[:, hi[layer]]
        y = torch.addcmul(y_hi, weight[:, :, None], y[:, lo[layer]].sub_(y_hi))
    return y.transpose(1, 2)
