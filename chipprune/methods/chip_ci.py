"""CHIP's channel independence, CI(i) = ||A||_* - ||A with row i zeroed||_*, for every channel
of a batch of feature maps (A: C x HW per image) at once, in float64, from one SVD per image.

Why not the Gram route (eigvalsh of the C principal (C-1)x(C-1) submatrices of G = A A^T, or
of A^T A - a_i a_i^T): exact in exact arithmetic, but eigvalsh has absolute error
~eps ||A||^2, so an eigenvalue that should be 0 comes back as ~1e-16 ||A||^2 and its square
root as ~1e-8 ||A||. Post-ReLU maps are rank deficient (dead channels, low-rank stages), and
there it misses 1e-9 by 20-200x (tests/test_chip.py, bench/chip_ci.py). Kept as `ci_gram`
for the benchmark.

The route used (`ci_spectral`). Take the SVD A = U S V^T with U the full C x C factor,
d_k = s_k^2 (0 beyond the rank), w_ik = u_ik^2, and M(t) = G + t^2 I. From
sqrt(x) = (2/pi) int_0^inf x / (x + t^2) dt, and since zeroing row i of A deletes row and
column i of G, tr(M_{-i}^-1) = tr(M^-1) - (M^-2)_ii / (M^-1)_ii gives

    CI(i) = (2/pi) int_0^inf  sum_k w_ik d_k / (d_k + t^2)^2  /  sum_k w_ik / (d_k + t^2)  dt.

Every term is positive (no cancellation: a small CI keeps its relative accuracy), and at a
fixed t both sums are one matrix product (C x r) @ (r,). The zero singular values of a
C > HW map only add w0_i / t^2 to the denominator, w0_i = sum_{k>HW} u_ik^2: the part of e_i
outside A's column space. Computed as 1 - sum_{k<=HW} u_ik^2 it has absolute error ~eps,
which brings the 1e-8 back for rows that no other row can replace (leverage one), so those
rows get it from the residual e_i - U U^T e_i (`complement_weights`). In u = log t the integrand is analytic in the strip
|Im u| < pi/2 (its poles are at t^2 = -d_k and t^2 = -(eigenvalues of G_{-i})), so the
trapezoidal rule in u converges like exp(-pi^2 / step): step 0.3 -> ~5e-15; measured
<= 2e-13 against the definition, which is the definition's own rounding level.

This uses the rank-one / interlacing structure that a secular-equation solver would, without
finding any root: no iterations, no special cases for tiny u_ik, repeated singular values or
rank deficiency, and after the SVD the work is one batched (C x r) @ (r x 2Q) matmul,
Q = 155 nodes. Rows of zeros get exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

# Trapezoidal rule in u = log(t / s_1): nodes t = 1e-15 .. 1e5 relative to the largest
# singular value, step 0.3. Beyond them the integrand in u is ~c / t above (c = ||a_i||^2 /
# s_1^2, next term 1e-10 smaller at 1e5) and at most t below, and the rest of the infinite
# trapezoidal sum is added as a geometric series; the error below is < 1e-15 s_1.
_STEP = 0.3
_T_LO, _T_HI = 1e-15, 1e5
_NODES = int(math.ceil(math.log(_T_HI / _T_LO) / _STEP)) + 1
_TAIL = math.exp(-_STEP) / (1.0 - math.exp(-_STEP))  # sum_{j>=1} exp(-j * step)
_CHUNK_BYTES = 64 << 20  # float64 temporaries per chunk of images


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """On CPU, compute CI on one thread. The matrices are small: on 2 cores shared with other
    jobs, MKL's threaded gesdd/syevd on them was 10-500x slower than one thread (64x64 SVD:
    243 vs 0.5 ms per image) and the whole route 2-10x slower; on idle cores two threads
    gained only 1.0-1.5x. Note: torch's thread count is process-wide while this runs."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def as_matrices(maps: Tensor) -> Tensor:
    """(B, C, H, W) or (B, C, HW) of any float dtype -> (B, C, HW) float64, same device."""
    if maps.ndim == 4:
        maps = maps.flatten(2)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, C, H, W) or (B, C, HW), got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise ValueError(f"maps must be a float tensor, got {maps.dtype}")
    maps = maps.to(torch.float64)
    if not bool(torch.isfinite(maps).all()):
        raise ValueError("maps contain NaN or inf")
    return maps


def image_chunks(b: int, per_image_bytes: int) -> list[slice]:
    """Slices of the batch whose float64 temporaries stay under _CHUNK_BYTES."""
    step = max(1, _CHUNK_BYTES // max(1, per_image_bytes))
    return [slice(i, min(b, i + step)) for i in range(0, b, step)]


def ci_definition(maps: Tensor) -> Tensor:
    """The reference: (B, C) float64, one float64 nuclear norm per channel with its row zeroed."""
    a = as_matrices(maps)
    b, c, n = a.shape
    out = torch.empty(b, c, dtype=torch.float64, device=a.device)
    eye = torch.eye(c, dtype=torch.bool, device=a.device)
    for j in range(b):
        full = torch.linalg.matrix_norm(a[j], ord="nuc")
        for rows in image_chunks(c, c * n * 8):  # channels per chunk, (k, C, HW) copies each
            zeroed = a[j].expand(rows.stop - rows.start, c, n).clone()  # (k, C, HW)
            zeroed[eye[rows]] = 0.0  # copy k has row rows.start + k zeroed
            out[j, rows] = full - torch.linalg.matrix_norm(zeroed, ord="nuc")
    return out


def spectral_weights(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, C, N) float64 -> s (B, r) singular values, descending; w (B, C, r) = u_ik^2;
    w0 (B, C) = weight of the zero singular values beyond r = min(C, N).

    The factorisation depends on the shape (measured, one thread): C < N: QR of A^T first,
    A = R^T Q^T, then the SVD of the C x C factor (faster than a thin SVD of A at every shape
    tried, 4.5x at 16 x 1024); C == N: SVD of A; C > N: thin QR A = Q1 R, SVD of the N x N
    factor, U = Q1 U_R, and w0 as in `complement_weights`.
    """
    b, c, n = a.shape
    if c <= n:
        # U is square, so the weights of each row sum to one and there is no w0
        x = a if c == n else torch.linalg.qr(a.mT, mode="r").R.mT  # (B, C, C), same U and s
        u, s, _ = torch.linalg.svd(x, full_matrices=False)  # (B, C, C), (B, C)
        return s, u.square(), a.new_zeros(b, c)
    q1, r = torch.linalg.qr(a, mode="reduced")  # (B, C, N), (B, N, N)
    u_r, s, _ = torch.linalg.svd(r, full_matrices=False)  # (B, N, N), (B, N)
    return s, (q1 @ u_r).square(), complement_weights(q1)


def complement_weights(q1: Tensor) -> Tensor:
    """(B, C, N) orthonormal columns -> (B, C) w0_i = ||e_i - Q1 Q1^T e_i||^2, the weight of
    e_i outside the column space.

    1 - ||row i of Q1||^2 has absolute error ~eps, harmless while w0_i >= 0.1 (CI moves by
    ~eps / sqrt(w0_i)) but not for rows with leverage near one. Those rows get the residual
    itself, whose components are accurate to ~eps absolute, so its squared norm is accurate
    to ~eps sqrt(w0_i): O(C N) per row instead of the O(C^2 N) of a complete Q (which took
    187 of 199 ms per image at 2048 x 49).
    """
    w0 = (1.0 - q1.square().sum(-1)).clamp_min(0.0)  # (B, C)
    k = int((w0 < 0.1).sum(-1).max())  # most near-leverage-one rows of any image
    if k == 0:
        return w0
    rows = w0.argsort(dim=-1)[:, :k]  # (B, k): the k smallest of each image
    qi = q1.gather(1, rows[:, :, None].expand(-1, -1, q1.shape[2]))  # (B, k, N)
    resid = -(q1 @ qi.mT)  # (B, C, k): column j = -Q1 Q1^T e_rows[j]
    resid.scatter_add_(1, rows[:, None, :], torch.ones_like(resid[:, :1]))  # + e_rows[j]
    return w0.scatter(1, rows, resid.square().sum(1))


def quadrature_nodes(device: torch.device) -> Tensor:
    """(Q,) nodes t_q = T_LO * exp(q * step), relative to the largest singular value."""
    q = torch.arange(_NODES, dtype=torch.float64, device=device)
    return torch.exp(math.log(_T_LO) + _STEP * q)


def ci_spectral(maps: Tensor) -> Tensor:
    """CI (B, C) float64 from one SVD per image and the integral in the module docstring."""
    a = as_matrices(maps)
    b, c, n = a.shape
    out = torch.empty(b, c, dtype=torch.float64, device=a.device)
    per_image = 8 * (c * c + 3 * c * n + (3 * c + 3 * min(c, n)) * _NODES)  # bytes, roughly
    t = quadrature_nodes(a.device)  # (Q,)
    with single_threaded(a.device):
        for sl in image_chunks(b, per_image):
            out[sl] = spectral_chunk(a[sl], t)
    # a row of zeros is independent of nothing: exactly 0, not rounding noise
    return out.masked_fill(a.abs().amax(-1) == 0, 0.0)


def spectral_chunk(a: Tensor, t: Tensor) -> Tensor:
    """(b, C, N) float64 maps, quadrature nodes t (Q,) -> CI (b, C)."""
    s, w, w0 = spectral_weights(a)  # (b, r), (b, C, r), (b, C)
    s1 = s[:, :1]  # (b, 1) largest singular value, the scale
    d = (s / s1.clamp_min(torch.finfo(torch.float64).tiny)).square()[:, :, None]  # (b, r, 1)
    t2 = t.square()
    shifted = d + t2  # (b, r, Q): d_k + t^2
    # one matmul for both sums over k: t^3 d_k / (d_k + t^2)^2 and t^2 / (d_k + t^2)
    both = w @ torch.cat([t2 * t * d / shifted.square(), t2 / shifted], dim=-1)  # (b, C, 2Q)
    num, den = both.split(t.numel(), dim=-1)  # (b, C, Q) each; den + w0 = t^2 (M^-1)_ii > 0
    f = num / (den + w0[:, :, None])  # (b, C, Q): the integrand in u = log t
    total = f.sum(-1) + _TAIL * (f[..., 0] + f[..., -1])  # trapezoid + geometric tails
    return (2.0 * _STEP / math.pi) * total * s1


def ci_gram(maps: Tensor) -> Tensor:
    """CI (B, C) by eigvalsh of the Gram matrix: the C principal (C-1)x(C-1) submatrices of
    A A^T, or for C > HW the rank-one downdates A^T A - a_i a_i^T. Benchmark only: loses
    accuracy (~1e-8 relative) on rank-deficient maps, see the module docstring."""
    a = as_matrices(maps)
    b, c, n = a.shape
    out = torch.empty(b, c, dtype=torch.float64, device=a.device)
    idx = torch.arange(c, device=a.device)
    keep = idx[None, :].expand(c, c)[idx[:, None] != idx[None, :]].view(c, c - 1)  # (C, C-1)
    side = min(c - 1, n)
    for j in range(b):
        x = a[j]
        g = x @ x.mT if c <= n else x.mT @ x  # (C, C) or (N, N)
        full = torch.linalg.eigvalsh(g).clamp_min(0).sqrt().sum()
        for rows in image_chunks(c, side * side * 8 * 2):
            if c <= n:
                k = keep[rows]  # (k, C-1)
                sub = g[k[:, :, None], k[:, None, :]]  # (k, C-1, C-1) principal submatrices
            else:
                ai = x[rows]  # (k, N)
                sub = g - ai[:, :, None] * ai[:, None, :]  # (k, N, N)
            out[j, rows] = full - torch.linalg.eigvalsh(sub).clamp_min(0).sqrt().sum(-1)
    return out


def channel_independence(maps: Tensor) -> Tensor:
    """CI of every channel of every image: maps (B, C, H, W) or (B, C, HW), any float dtype
    and device -> (B, C) float64 on that device, within ~1e-12 of the definition.

    One route for every shape: `ci_spectral` (inside it the factorisation follows the shape,
    see `spectral_weights`). Measured on one CPU thread it beat the Gram route at every shape
    of bench/chip_ci.py (2.3x at 16 x 1024 to 36x at 256 x 196), and only it stays within
    1e-9 on rank-deficient maps (module docstring), so there is nothing to dispatch on.
    """
    return ci_spectral(maps)
