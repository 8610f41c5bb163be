"""Internal (Z-matrix) coordinates: a fixed bijection y -> x for molecules with exact log |det J|.

Layout of y (length d = 3N - 3, lengths in nm, angles in radians)::

    y[0:3]   b1, b2, a2      bond a1-a0, bond a2-j, angle a2-j-k of the first three atoms,
                             where (j, k) is (a1, a0) or (a0, a1) (row 2 of the Z-matrix)
    y[3:6]   omega           rotation vector (|omega| < pi) of the frame of atoms a0, a1, a2
    y[6:]    b, a, t         per remaining Z-matrix row [i, j, k, l]: bond i-j, angle i-j-k,
                             torsion i-j-k-l (IUPAC sign, in (-pi, pi])

x (length 3N, nm, topology atom order) is mean-free: its centre of geometry is at the origin,
matching the package's unweighted mean-free projection. The map is a bijection between
{b > 0, 0 < a < pi, |omega| < pi} and the mean-free configurations whose reference atoms are not
collinear.

Log-determinant. Measured with the Euclidean volume of the mean-free subspace (an orthonormal
basis Q of shape (3N, 3N - 3): log |det Q^T dx/dy|),

    log |det| = sum over the N - 1 bonds  2 log b
              + sum over the N - 2 angles   log sin a
              + log(2 (1 - cos|omega|) / |omega|^2)
              - 1.5 log N.

Derivation: in Cartesians, d^3N x = d^3 x_a0 * b1^2 sin(theta) db1 dtheta dphi *
b2^2 sin(a2) db2 da2 dpsi * prod_rows b^2 sin(a) db da dt, with (theta, phi, psi) Euler angles
of the frame, whose measure sin(theta) dtheta dphi dpsi is the Haar measure of SO(3) of mass
8 pi^2; in rotation-vector coordinates the same measure is 2 (1 - cos|omega|) / |omega|^2 d^3 omega.
Replacing x_a0 by the centre of geometry c is a unit-Jacobian shift, and the orthonormal
coordinate along the translations is sqrt(N) c, so d^3N x = N^(3/2) d^3 c d^(3N-3) u.
"""
from __future__ import annotations

import math
from collections import deque
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import nn


def build_zmatrix(topology, root: Optional[int] = None) -> np.ndarray:
    """Placement order and reference atoms from the bond graph of a topology.

    A breadth-first search over the bonds from ``root`` (heavy neighbours expanded first) gives a
    spanning tree; ring-closure bonds are simply not used. Each atom i reached from its tree
    parent j gets the angle partner k = parent of j (or another placed neighbour of j). The
    torsion partner l is an earlier-placed child of j if there is one (a branch: the "sibling"
    torsion i-j-k-l is nearly rigid, e.g. the second and third hydrogen of a methyl group),
    else the parent of k (or another placed neighbour of k, or else a placed neighbour of j).

    Parameters
    ----------
    topology : openmm.app.Topology
        Must contain the bonds and form one connected molecule with at least 3 atoms.
    root : int, optional
        Index of the central atom of the first three (needs >= 2 bonded neighbours). Default:
        the first heavy atom with >= 2 heavy neighbours (else the first atom with >= 2 neighbours).

    Returns
    -------
    numpy.ndarray of int64, shape (N, 4)
        Rows [atom, bond partner, angle partner, torsion partner] in placement order; the first
        three rows are [a0, -1, -1, -1], [a1, a0, -1, -1] and [a2, j, k, -1] (partners not
        used are -1). ``zmatrix[3:]`` is the (N - 3, 4) table of the placed atoms.
    """
    atoms = list(topology.atoms())
    n = len(atoms)
    if n < 3:
        raise ValueError("internal coordinates need at least 3 atoms")
    nbr: List[List[int]] = [[] for _ in range(n)]
    for bond in topology.bonds():
        i, j = bond[0].index, bond[1].index
        if i != j and j not in nbr[i]:
            nbr[i].append(j)
            nbr[j].append(i)
    heavy = [a.element is None or a.element.atomic_number > 1 for a in atoms]
    for i in range(n):  # heavy neighbours first, then by index: a deterministic order
        nbr[i].sort(key=lambda j: (not heavy[j], j))
    if root is None:
        cands = [i for i in range(n) if heavy[i] and sum(heavy[j] for j in nbr[i]) >= 2]
        cands = cands or [i for i in range(n) if len(nbr[i]) >= 2]
        if not cands:
            raise ValueError("no atom with two bonded neighbours: are the bonds missing?")
        root = cands[0]
    if len(nbr[root]) < 2:
        raise ValueError(f"root atom {root} has fewer than two bonded neighbours")
    a0, a1, a2 = nbr[root][0], root, nbr[root][1]
    parent = {a0: a1, a1: a0, a2: a1}
    order = [a0, a1, a2]
    rows = [[a0, -1, -1, -1], [a1, a0, -1, -1], [a2, a1, a0, -1]]
    queue = deque([a1, a0, a2])
    while queue:
        j = queue.popleft()
        for i in nbr[j]:
            if i in parent:
                continue  # already placed: a ring closure or the tree edge to the parent
            placed_j = [m for m in nbr[j] if m in parent]
            k = next(m for m in [parent[j]] + placed_j if m != i)
            # A branch (second or later child of j) takes its torsion relative to an earlier sibling:
            # i-j-k-sibling stays near +-120 degrees, so only one torsion per rotor is free.
            siblings = [m for m in placed_j if parent[m] == j and m != k]
            lc = siblings + [parent[k]] + [m for m in nbr[k] if m in parent] + placed_j + order
            m4 = next(m for m in lc if m not in (i, j, k))
            parent[i] = j
            order.append(i)
            rows.append([i, j, k, m4])
            queue.append(i)
    if len(order) != n:
        raise ValueError(f"the bond graph is not connected: reached {len(order)} of {n} atoms")
    return np.asarray(rows, dtype=np.int64)


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cross(u, v, dim=-1)


def _unit(u: torch.Tensor) -> torch.Tensor:
    return u / torch.linalg.vector_norm(u, dim=-1, keepdim=True)


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (u * v).sum(-1)


def _rotation(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vector (B, 3) -> matrix (B, 3, 3)."""
    th2 = (omega * omega).sum(-1)
    small = th2 < 1e-8
    th2s = torch.where(small, torch.ones_like(th2), th2)
    th = torch.sqrt(th2s)
    A = torch.where(small, 1.0 - th2 / 6.0, torch.sin(th) / th)
    Bc = torch.where(small, 0.5 - th2 / 24.0, (1.0 - torch.cos(th)) / th2s)
    w0, w1, w2 = omega[:, 0], omega[:, 1], omega[:, 2]
    zero = torch.zeros_like(w0)
    K = torch.stack([zero, -w2, w1, w2, zero, -w0, -w1, w0, zero], -1).view(-1, 3, 3)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(K)
    return eye + A[:, None, None] * K + Bc[:, None, None] * (K @ K)


def _rotation_vector(R: torch.Tensor) -> torch.Tensor:
    """Matrix (B, 3, 3) -> rotation vector (B, 3), |omega| <= pi, via a stable quaternion."""
    r00, r11, r22 = R[:, 0, 0], R[:, 1, 1], R[:, 2, 2]
    tr = r00 + r11 + r22
    d0, d1, d2 = R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]
    s01, s02, s12 = R[:, 0, 1] + R[:, 1, 0], R[:, 0, 2] + R[:, 2, 0], R[:, 1, 2] + R[:, 2, 1]
    # four quaternion candidates (w, x, y, z) times 4w, 4x, 4y, 4z; use the best conditioned one
    q = torch.stack([
        torch.stack([1.0 + tr, d0, d1, d2], -1),
        torch.stack([d0, 1.0 + 2.0 * r00 - tr, s01, s02], -1),
        torch.stack([d1, s01, 1.0 + 2.0 * r11 - tr, s12], -1),
        torch.stack([d2, s02, s12, 1.0 + 2.0 * r22 - tr], -1),
    ], 1)  # (B, 4 candidates, 4)
    best = torch.stack([tr, r00, r11, r22], -1).argmax(-1)
    q = q[torch.arange(R.shape[0], device=R.device), best]
    q = q * (1.0 - 2.0 * (q[:, 0:1] < 0).to(q.dtype))  # w >= 0: angle in [0, pi]
    w, v = q[:, 0], q[:, 1:]
    s = torch.linalg.vector_norm(v, dim=-1)
    tiny = s < 1e-12 * w
    ss = torch.where(tiny, torch.ones_like(s), s)
    f = torch.where(tiny, 2.0 / w, 2.0 * torch.atan2(s, w) / ss)
    return f[:, None] * v


class InternalCoordinates(nn.Module):
    """Z-matrix bijection y (3N - 3 internal + orientation coordinates) -> mean-free x (3N, nm).

    See the module docstring for the layout of y and the log-determinant. TorchScript-compatible;
    float64 recommended.

    Parameters
    ----------
    zmatrix : array-like of int, shape (N, 4)
        As returned by :func:`build_zmatrix` (first three rows padded with -1).
    n_atoms : int
        N, the number of atoms (every atom must appear exactly once in column 0).
    """

    def __init__(self, zmatrix, n_atoms: int):
        super().__init__()
        z = torch.as_tensor(np.asarray(zmatrix), dtype=torch.int64)
        if z.shape != (n_atoms, 4):
            raise ValueError(f"zmatrix must have shape ({n_atoms}, 4), got {tuple(z.shape)}")
        if sorted(z[:, 0].tolist()) != list(range(n_atoms)):
            raise ValueError("column 0 of the zmatrix must list every atom once")
        pos = {int(a): r for r, a in enumerate(z[:, 0].tolist())}
        if int(z[1, 1]) != int(z[0, 0]) or sorted(z[2, 1:3].tolist()) != sorted(z[:2, 0].tolist()):
            raise ValueError("the first three rows must be [a0], [a1, a0], [a2, j, k], {j, k} = {a0, a1}")
        for r in range(3, n_atoms):
            refs = z[r, 1:].tolist()
            if len(set(refs + [int(z[r, 0])])) != 4 or any(pos.get(m, r) >= r for m in refs):
                raise ValueError(f"row {r} must reference three distinct atoms placed before it")
        self.n_atoms = n_atoms
        self.a0, self.a1, self.a2 = int(z[0, 0]), int(z[1, 0]), int(z[2, 0])
        self.a2_on_a0 = int(z[2, 1]) == self.a0  # is the bond partner of a2 a0 (not a1)?
        self.rows: List[List[int]] = [[int(v) for v in row] for row in z[3:].tolist()]
        self.register_buffer("zmatrix", z)
        self.register_buffer("idx", z[3:].clone())
        self.log_n = 1.5 * math.log(n_atoms)

    # -- the map -----------------------------------------------------------------------------------
    def log_det(self, y: torch.Tensor) -> torch.Tensor:
        """log |det dx/dy| on the mean-free subspace (orthonormal-basis measure), shape (B,)."""
        b = torch.cat([y[:, 0:2], y[:, 6::3]], 1)
        a = torch.cat([y[:, 2:3], y[:, 7::3]], 1)
        th = torch.linalg.vector_norm(y[:, 3:6], dim=-1)
        # 2 (1 - cos th) / th^2 = sinc(th / 2)^2, torch.sinc(u) = sin(pi u) / (pi u)
        rot = 2.0 * torch.log(torch.sinc(th / (2.0 * math.pi)))
        return 2.0 * torch.log(b).sum(-1) + torch.log(torch.sin(a)).sum(-1) + rot - self.log_n

    def forward(self, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Internal coordinates y (B, 3N - 3) -> mean-free Cartesians x (B, 3N) nm, log |det|."""
        B = y.shape[0]
        zero = torch.zeros(B, dtype=y.dtype, device=y.device)
        pos: List[torch.Tensor] = [torch.zeros(B, 3, dtype=y.dtype, device=y.device)] * self.n_atoms
        b1, b2, a2 = y[:, 0], y[:, 1], y[:, 2]
        pos[self.a1] = torch.stack([b1, zero, zero], -1)
        # a2 = x_j + b2 (cos a2 u + sin a2 e2), u = unit(x_k - x_j) = +-e1
        if self.a2_on_a0:
            pos[self.a2] = torch.stack([b2 * torch.cos(a2), b2 * torch.sin(a2), zero], -1)
        else:
            pos[self.a2] = torch.stack([b1 - b2 * torch.cos(a2), b2 * torch.sin(a2), zero], -1)
        for r, row in enumerate(self.rows):
            c = 6 + 3 * r
            b, a, t = y[:, c:c + 1], y[:, c + 1:c + 2], y[:, c + 2:c + 3]
            xj, xk, xl = pos[row[1]], pos[row[2]], pos[row[3]]
            e1 = _unit(xj - xk)
            n = _unit(_cross(xk - xl, e1))
            m = _cross(n, e1)
            d = torch.cos(t) * m + torch.sin(t) * n
            pos[row[0]] = xj + b * (torch.sin(a) * d - torch.cos(a) * e1)
        p = torch.stack(pos, 1)  # (B, N, 3), canonical frame
        p = p - p.mean(1, keepdim=True)
        x = p @ _rotation(y[:, 3:6]).transpose(1, 2)
        return x.reshape(B, 3 * self.n_atoms), self.log_det(y)

    @torch.jit.export
    def inverse(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cartesians x (B, 3N) nm -> internal coordinates y (B, 3N - 3), log |det dx/dy|.

        The centre of geometry of x is discarded (x is treated as its mean-free projection).
        """
        B = x.shape[0]
        p = x.view(B, self.n_atoms, 3)
        x0, x1, x2 = p[:, self.a0], p[:, self.a1], p[:, self.a2]
        xj, xk = (x0, x1) if self.a2_on_a0 else (x1, x0)
        e1 = _unit(x1 - x0)
        v = x2 - xj
        e2 = _unit(v - _dot(v, e1)[:, None] * e1)
        R = torch.stack([e1, e2, _cross(e1, e2)], -1)  # columns: the frame
        u = xk - xj
        head = torch.stack([
            torch.linalg.vector_norm(x1 - x0, dim=-1),
            torch.linalg.vector_norm(v, dim=-1),
            torch.atan2(torch.linalg.vector_norm(_cross(u, v), dim=-1), _dot(u, v)),
        ], -1)
        omega = _rotation_vector(R)
        pi, pj = p[:, self.idx[:, 0]], p[:, self.idx[:, 1]]
        pk, pl = p[:, self.idx[:, 2]], p[:, self.idx[:, 3]]
        vij, vkj = pi - pj, pk - pj
        bond = torch.linalg.vector_norm(vij, dim=-1)
        angle = torch.atan2(torch.linalg.vector_norm(_cross(vij, vkj), dim=-1), _dot(vij, vkj))
        # IUPAC dihedral l-k-j-i
        c1, c2, c3 = pk - pl, pj - pk, pi - pj
        n1, n2 = _cross(c1, c2), _cross(c2, c3)
        tors = torch.atan2(torch.linalg.vector_norm(c2, dim=-1) * _dot(c1, n2), _dot(n1, n2))
        rest = torch.stack([bond, angle, tors], -1).reshape(B, -1)
        y = torch.cat([head, omega, rest], 1)
        return y, self.log_det(y)
