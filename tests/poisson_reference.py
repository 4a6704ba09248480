"""A direct sparse solve of a Poisson blend, the reference both Poisson solvers are tested against."""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg

NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def sparse_reference(
    target: np.ndarray,
    source: np.ndarray,
    mask: np.ndarray,
    mixed: bool = False,
    unknown: np.ndarray | None = None,
) -> np.ndarray:
    """One (H, W) channel blended by assembling Pérez et al.'s linear system pixel by pixel and solving it.

    The unknowns are `unknown` (default: the mask off the image border, the CG's problem); every
    other pixel keeps the target. The guidance of an edge is the source's difference when either end
    lies in the mask (with `mixed`, the target's where it is strictly stronger), else the target's.
    """
    if unknown is None:
        unknown = mask.astype(bool).copy()
        unknown[[0, -1], :] = False
        unknown[:, [0, -1]] = False
    pixels = [tuple(p) for p in np.argwhere(unknown)]
    index = {p: i for i, p in enumerate(pixels)}
    rows, cols, values = [], [], []
    rhs = np.zeros(len(pixels))
    for i, (y, x) in enumerate(pixels):
        rows.append(i)
        cols.append(i)
        values.append(4.0)
        for dy, dx in NEIGHBOURS:
            q = (y + dy, x + dx)
            guidance = target[y, x] - target[q]
            if mask[y, x] or mask[q]:
                from_source = source[y, x] - source[q]
                guidance = guidance if mixed and abs(guidance) > abs(from_source) else from_source
            rhs[i] += guidance
            if q in index:
                rows.append(i)
                cols.append(index[q])
                values.append(-1.0)
            else:
                rhs[i] += target[q]
    matrix = scipy.sparse.csr_matrix((values, (rows, cols)), shape=(len(pixels), len(pixels)))
    out = target.astype(np.float64).copy()
    if pixels:
        out[unknown] = scipy.sparse.linalg.spsolve(matrix, rhs)
    return out
