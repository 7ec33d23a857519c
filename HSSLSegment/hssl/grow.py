"""Seeded region competition on the scan's intensities (the idea behind Slicer's *Grow from seeds*).

Every voxel takes the label of the seed it is "closest" to, where the length of a path is the sum
of the absolute intensity steps along it plus ``distance_penalty`` per millimetre: labels spread
easily through uniform tissue and stop at edges. It is a shortest-path problem on the voxel grid
(6-connected), solved with SciPy's multi-source Dijkstra, which also reports from which seed each
voxel's shortest path starts.

The engine uses it in two ways: from the painted slices alone (what a Slicer user gets from *Grow
from seeds*) and from the painted slices plus the voxels the fine-tuned network is sure about, so
that the network decides the shape and the intensities decide the boundary (``hssl.refine``).

Arrays are ``[z, y, x]``; spacing is ``[z, y, x]`` mm.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from .errors import HSSLError

MAX_GROW_VOXELS = 40_000_000  # at 6-connectivity, about 2 GB of graph; larger regions are refused (crop first)


def max_voxels(connectivity: int = 6) -> int:
    """The largest region ``grow_from_seeds`` takes at ``connectivity``: the graph's edges grow with
    it (3 per voxel at 6, 13 at 26), its memory with them."""
    return MAX_GROW_VOXELS * 6 // connectivity


def _offsets(connectivity: int) -> list[tuple[int, int, int]]:
    """One of each pair of opposite neighbour offsets: 6 (faces), 18 (faces, edges) or 26 (and corners)
    connectivity, as (dz, dy, dx)."""
    if connectivity not in (6, 18, 26):
        raise HSSLError(f"grow: connectivity must be 6, 18 or 26, not {connectivity}")
    reach = {6: 1, 18: 2, 26: 3}[connectivity]  # most axes an offset may step along
    # Tuples greater than (0, 0, 0): the first non-zero step is positive, one of each opposite pair.
    return [o for o in itertools.product((-1, 0, 1), repeat=3) if o > (0, 0, 0) and sum(map(abs, o)) <= reach]


def _edges(shape: Sequence[int], mask: np.ndarray | None, connectivity: int = 6):
    """Pairs of neighbours (flat indices into ``shape``; int32 when they fit), both inside ``mask``
    when given, per offset."""
    n = int(np.prod(shape))
    index = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64).reshape(shape)
    for offset in _offsets(connectivity):
        a, b = [], []
        for d in offset:
            a.append(slice(None) if d == 0 else slice(0, -1) if d > 0 else slice(1, None))
            b.append(slice(None) if d == 0 else slice(1, None) if d > 0 else slice(0, -1))
        a, b = tuple(a), tuple(b)
        ia, ib = index[a], index[b]
        if mask is not None:
            keep = mask[a] & mask[b]
            ia, ib = ia[keep], ib[keep]
        yield offset, a, b, ia.ravel(), ib.ravel(), (None if mask is None else keep)


def grow_from_seeds(image: np.ndarray, seeds: np.ndarray, spacing_zyx: Sequence[float],
                    distance_penalty: float = 0.0, mask: np.ndarray | None = None,
                    edge_cost: np.ndarray | None = None, connectivity: int = 6) -> np.ndarray:
    """Label every voxel with the label of its nearest seed (see the module docstring).

    image: float ``[z, y, x]`` intensities, best normalised to about [0, 1] so that
    ``distance_penalty`` (cost per mm) is comparable across scans. seeds: integer ``[z, y, x]``,
    0 = not a seed. mask: optional bool, voxels outside stay 0 and paths never cross them.
    edge_cost: optional float ``[z, y, x]`` map added to the cost of entering a voxel (e.g. how
    strongly a second opinion puts a boundary there). connectivity: 6 (faces), 18 or 26 (every
    neighbour, as Slicer's effect). Returns the labels, ``seeds``' dtype.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    image = np.asarray(image, dtype=np.float32)
    seeds = np.asarray(seeds)
    if image.shape != seeds.shape or image.ndim != 3:
        raise HSSLError(f"grow: the image {image.shape} and the seeds {seeds.shape} must be one 3D grid")
    if mask is not None and mask.shape != image.shape:
        raise HSSLError(f"grow: the mask {mask.shape} must be on the image grid {image.shape}")
    n = image.size
    if n > max_voxels(connectivity):
        raise HSSLError(f"grow: {n / 1e6:.0f} M voxels is too large a region for {connectivity}-connectivity: "
                        "crop the volume")
    seed_idx = np.flatnonzero(seeds.reshape(-1) != 0 if mask is None else ((seeds != 0) & mask).reshape(-1))
    out = np.zeros(seeds.shape, dtype=seeds.dtype)
    if seed_idx.size == 0:
        return out
    rows, cols, weights = [], [], []
    # SciPy drops edges of weight 0; a floor far below any intensity step keeps them.
    floor = 1e-6
    for offset, a, b, ia, ib, keep in _edges(image.shape, mask, connectivity):
        w = np.abs(image[a] - image[b])
        if edge_cost is not None:
            w = w + 0.5 * (edge_cost[a] + edge_cost[b])
        step_mm = float(np.sqrt(sum((d * float(sp)) ** 2 for d, sp in zip(offset, spacing_zyx))))
        w = w + distance_penalty * step_mm + floor
        rows.append(ia)
        cols.append(ib)
        weights.append((w if keep is None else w[keep]).ravel().astype(np.float64))
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)).tocsr()
    del rows, cols, weights
    _, _, sources = dijkstra(graph, directed=False, indices=seed_idx, min_only=True, return_predecessors=True)
    flat = out.reshape(-1)
    reached = sources >= 0
    flat[reached] = seeds.reshape(-1)[sources[reached]]
    if mask is not None:
        out[~mask] = 0
    return out
