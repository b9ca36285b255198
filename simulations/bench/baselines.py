"""TIFU-KNN (Hu et al., SIGIR 2020), a next-basket baseline from the literature. Pure numpy/torch.

Implemented from the paper's description ("Modeling Personalized Item Frequency Information
for Next-basket Recommendation"):

* A member's baskets b_1 … b_n (binary item vectors, oldest first) are cut into groups of
  ``group_size`` consecutive baskets; the oldest group takes the remainder.
* Within a group of x baskets the j-th counts with ``r_b^(x−j)`` (the newest 1), averaged
  over x; across k groups the i-th counts with ``r_g^(k−i)``, averaged over k. The sum is
  the member's time-decayed personal item-frequency vector u.
* Prediction: ``α·u + (1 − α)·mean(u of the member's n_neighbors nearest members)``,
  nearest by Euclidean distance between these vectors.

Here it is a **centralized, non-private** reference: the neighbours come from every store's
members pooled. A member without history gets u = 0 (only neighbours); ties among items
are broken by the store's popularity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.data.dataset import MemberLog


@dataclass(frozen=True)
class TifuConfig:
    group_size: int = 7
    r_b: float = 0.9  # within-group decay
    r_g: float = 0.7  # across-group decay
    alpha: float = 0.7  # weight of the member's own vector
    n_neighbors: int = 300


def member_vectors(log: MemberLog, upto: np.ndarray, n_items: int, cfg: TifuConfig) -> np.ndarray:
    """u for each member of ``log`` from their first ``upto[m]`` receipts, [M, n_items] float32."""
    m_count = len(upto)
    out = np.zeros((m_count, n_items), dtype=np.float32)
    n = np.asarray(upto, dtype=np.int64)
    if n.sum() == 0:
        return out
    member = np.repeat(np.arange(m_count), n)
    j = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # basket position, oldest 0
    receipt = log.receipt_ptr[:-1][member] + j
    size = cfg.group_size
    k = -(-n // size)  # groups per member
    shift = k * size - n  # the oldest group is short by this much
    group = (j + shift[member]) // size
    first_len = size - shift
    group_len = np.where(group == 0, first_len[member], size)
    pos = np.where(group == 0, j, (j + shift[member]) % size)
    weight = (cfg.r_g ** (k[member] - 1 - group) / k[member]) * (cfg.r_b ** (group_len - 1 - pos) / group_len)
    lines_per_receipt = log.line_ptr[receipt + 1] - log.line_ptr[receipt]
    line = np.concatenate([np.arange(log.line_ptr[r], log.line_ptr[r + 1]) for r in receipt])
    np.add.at(out, (np.repeat(member, lines_per_receipt), log.line_item[line]), np.repeat(weight, lines_per_receipt))
    return out


def nearest(queries: np.ndarray, pool: np.ndarray, n_neighbors: int, exclude: np.ndarray | None = None,
            block: int = 1024) -> np.ndarray:
    """Indices into ``pool`` of each query's ``n_neighbors`` nearest rows (Euclidean), nearest first.

    ``exclude[q]`` (an index into ``pool`` or −1) is left out: a member is not their own neighbour.
    """
    k = min(n_neighbors, len(pool) - (1 if exclude is not None else 0))
    if k <= 0 or len(queries) == 0:
        return np.zeros((len(queries), 0), dtype=np.int64)
    p = torch.as_tensor(pool)
    p_sq = (p * p).sum(1)
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), block):
        q = torch.as_tensor(queries[start:start + block])
        d = p_sq[None, :] - 2.0 * q @ p.T  # + |q|², the same for the whole row
        if exclude is not None:
            ex = torch.as_tensor(exclude[start:start + block])
            rows = torch.nonzero(ex >= 0).squeeze(1)
            d[rows, ex[rows]] = float("inf")
        out[start:start + len(q)] = torch.topk(d, k, dim=1, largest=False).indices.numpy()
    return out


def predict(own: np.ndarray, pool: np.ndarray, neighbors: np.ndarray, cfg: TifuConfig) -> np.ndarray:
    """α·u + (1 − α)·mean of the first ``cfg.n_neighbors`` neighbours' u, [N, n_items]."""
    from scipy import sparse

    nb = neighbors[:, :cfg.n_neighbors]
    if nb.shape[1] == 0:
        return cfg.alpha * own
    rows = np.repeat(np.arange(len(nb)), nb.shape[1])
    average = sparse.csr_matrix((np.full(nb.size, 1.0 / nb.shape[1], dtype=np.float32), (rows, nb.ravel())),
                                shape=(len(nb), len(pool)))
    return cfg.alpha * own + (1.0 - cfg.alpha) * np.asarray(average @ pool)
