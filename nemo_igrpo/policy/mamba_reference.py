"""Pure-torch reference versions of the Mamba-2 kernels megatron-core's MambaMixer calls.

megatron-core 0.19 runs a Mamba-2 layer through three CUDA/Triton-only packages: mamba-ssm's
fused `mamba_split_conv1d_scan_combined` (training and log-probs), its `mamba_chunk_scan_combined`
and gated `RMSNorm` (prefill / non-memory-efficient path), and causal-conv1d's `causal_conv1d_fn`.
None of them runs without a GPU. This module gives each one a small torch implementation with the
same signature and semantics, so the CPU tests build the *same* megatron hybrid model that runs on
GPUs. `cpu_compat.install_mamba_reference_kernels()` puts them into megatron's mixer module only
when CUDA is absent; on a GPU the real kernels run and nothing here is imported.

Semantics (Mamba-2 / SSD, Dao & Gu 2024), per head h with state size n and head dim p:

    dt_t  = softplus(dt_raw_t + dt_bias)               (clamped to dt_limit)
    S_t   = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T    (S: [p, n], starts at 0 or initial_states)
    y_t   = S_t C_t + D * x_t                            (then * silu(z_t) when a gate z is given)

computed chunk by chunk like the kernels (exact within a chunk as a masked "attention" product,
states carried between chunks), in float32 whatever the input dtype. `seq_idx` (one id per token,
from the packed-sequence boundaries) makes every run of equal ids its own sequence: the
convolution never reads across a boundary and the state restarts at zero there. The functions
are differentiable with plain autograd (no custom backward), which is all the CPU tests need; they
are written for clarity, not speed.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

_NO_LIMIT = (0.0, float("inf"))


def causal_conv1d_fn(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[Tensor] = None,
    activation: Optional[str] = None,
) -> Tensor:
    """causal-conv1d's depthwise causal convolution. x [b, d, l], weight [d, w], bias [d],
    seq_idx [b, l] int. out[:, :, t] = bias + sum_k weight[:, k] * x[:, :, t - w + 1 + k], where a
    tap that falls before the sequence start (position < 0 or another seq_idx) reads zero."""
    if initial_states is not None or return_final_states or final_states_out is not None:
        raise NotImplementedError("causal_conv1d_fn reference: conv states are not supported (not used by training)")
    if activation not in (None, "silu", "swish"):
        raise NotImplementedError(f"causal_conv1d_fn reference: activation {activation!r}")
    length, width = x.shape[-1], weight.shape[-1]
    xf = F.pad(x.float(), (width - 1, 0))
    w = weight.float()
    if seq_idx is not None:
        ids = F.pad(seq_idx, (width - 1, 0), value=-1)
    out = None
    # One multiply-add per tap (width is 4 in every Mamba-2 model) keeps the boundary rule explicit.
    for k in range(width):
        tap = xf[:, :, k : k + length] * w[:, k, None]
        if seq_idx is not None:
            tap = tap * (ids[:, k : k + length] == seq_idx).unsqueeze(1)
        out = tap if out is None else out + tap
    if bias is not None:
        out = out + bias.float()[:, None]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)


def _segsum(x: Tensor) -> Tensor:
    """[..., T] -> [..., T, T]: out[..., i, j] = x[j+1] + ... + x[i] for i >= j, -inf above the
    diagonal, so exp(out) is the decay from step j to step i (a causal mask for free)."""
    size = x.shape[-1]
    rep = x[..., None].expand(*x.shape, size)  # rep[..., i, j] = x[i]
    below = torch.ones(size, size, dtype=torch.bool, device=x.device).tril(-1)
    sums = torch.cumsum(rep.masked_fill(~below, 0.0), dim=-2)
    return sums.masked_fill(~torch.ones_like(below).tril(), float("-inf"))


def _ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, initial_state: Optional[Tensor]
) -> tuple[Tensor, Tensor]:
    """One sequence per batch row, float32. x [b, l, h, p], dt [b, l, h] (already softplus'd),
    A [h], B/C [b, l, h, n] (groups already expanded to heads), initial_state [b, h, p, n].
    Returns y [b, l, h, p] without the D term, and the final state [b, h, p, n]."""
    b, length, h, p = x.shape
    n = B.shape[-1]
    pad = (-length) % chunk_size
    if pad:
        # Zero dt at the padded tail: decay exp(0) = 1 and no input, so the final state is exact.
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    chunks = (length + pad) // chunk_size
    x, B, C = (t.reshape(b, chunks, chunk_size, h, t.shape[-1]) for t in (x, B, C))
    dt = dt.reshape(b, chunks, chunk_size, h)
    x_dt = x * dt[..., None]
    dA = (dt * A).permute(0, 3, 1, 2)  # [b, h, c, L]
    dA_cum = torch.cumsum(dA, dim=-1)

    # 1. Outputs from inputs of the same chunk: a causal, decay-weighted C.B^T product.
    decay_within = torch.exp(_segsum(dA))  # [b, h, c, L(target), L(source)]
    y_within = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay_within, x_dt)
    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = torch.exp(dA_cum[..., -1:] - dA_cum)  # [b, h, c, L]
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x_dt)
    # 3. Carry states across chunks: start state of chunk k = sum over earlier chunk ends (and the
    # initial state) decayed through the chunks in between.
    start = initial_state.float()[:, None] if initial_state is not None else x.new_zeros(b, 1, h, p, n)
    chunk_states = torch.cat([start, chunk_states], dim=1)  # [b, c+1, h, p, n]
    decay_chunks = torch.exp(_segsum(F.pad(dA_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    carried = torch.einsum("bhzc,bchpn->bzhpn", decay_chunks, chunk_states)
    starts, final = carried[:, :-1], carried[:, -1]
    # 4. Outputs from the carried start state, decayed to each position.
    y_carried = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, starts, torch.exp(dA_cum))
    y = (y_within + y_carried).reshape(b, chunks * chunk_size, h, p)[:, :length]
    return y, final


def _runs(ids: Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the runs of equal values in a 1-D tensor (packed sequences are contiguous)."""
    ids = ids.tolist()
    bounds = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
    return list(zip(bounds[:-1], bounds[1:]))


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    dt_bias: Optional[Tensor] = None,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    **unused,
):
    """mamba-ssm's SSD scan. x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n], D [h] or
    [h, p], z [b, l, h, p], dt_bias [h], initial_states [b, h, p, n], seq_idx [b, l].
    Returns y [b, l, h, p] in x's dtype (and the final state [b, h, p, n], float32)."""
    if cu_seqlens is not None or return_varlen_states:
        raise NotImplementedError("mamba_chunk_scan_combined reference: varlen states are not supported")
    heads, groups = x.shape[2], B.shape[2]
    dtf = dt.float()
    if dt_bias is not None:
        dtf = dtf + dt_bias.float()
    if dt_softplus:
        dtf = F.softplus(dtf)
    if tuple(dt_limit) != _NO_LIMIT:
        dtf = dtf.clamp(min=dt_limit[0], max=dt_limit[1])
    xf, Af = x.float(), A.float()
    Bf = B.float().repeat_interleave(heads // groups, dim=2)
    Cf = C.float().repeat_interleave(heads // groups, dim=2)
    if seq_idx is None:
        y, final = _ssd_chunked(xf, dtf, Af, Bf, Cf, chunk_size, initial_states)
    else:
        # Every packed sequence is scanned on its own: the state restarts at zero at each
        # boundary (the initial state, if any, belongs to the first sequence of a row).
        rows, finals = [], []
        for r in range(x.shape[0]):
            pieces, state = [], None
            for i, (s, e) in enumerate(_runs(seq_idx[r])):
                init = initial_states[r : r + 1] if (initial_states is not None and i == 0) else None
                y_piece, state = _ssd_chunked(
                    xf[r : r + 1, s:e],
                    dtf[r : r + 1, s:e],
                    Af,
                    Bf[r : r + 1, s:e],
                    Cf[r : r + 1, s:e],
                    chunk_size,
                    init,
                )
                pieces.append(y_piece)
            rows.append(torch.cat(pieces, dim=1))
            finals.append(state)
        y, final = torch.cat(rows, dim=0), torch.cat(finals, dim=0)
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(x.dtype)
    return (y, final) if return_final_states else y


def rms_norm_gated(
    x: Tensor,
    weight: Tensor,
    z: Optional[Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = True,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """mamba-ssm's gated RMSNorm: RMS-normalise each group of `group_size` channels, scale by
    `weight`; the gate silu(z) multiplies the input (norm_before_gate=False, Mamba-2's choice) or
    the output. float32 inside, x's dtype out."""
    xf = x.float()
    if z is not None and not norm_before_gate:
        xf = xf * F.silu(z.float())
    size = group_size or xf.shape[-1]
    grouped = xf.reshape(*xf.shape[:-1], xf.shape[-1] // size, size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = grouped.reshape(xf.shape) * weight.float()
    if bias is not None:
        out = out + bias.float()
    if z is not None and norm_before_gate:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


class RMSNormGated(torch.nn.Module):
    """mamba-ssm's `ops.triton.layernorm_gated.RMSNorm` (constructor and forward), on rms_norm_gated."""

    def __init__(
        self,
        hidden_size: int,
        eps: float = 1e-5,
        group_size: Optional[int] = None,
        norm_before_gate: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x: Tensor, z: Optional[Tensor] = None) -> Tensor:
        return rms_norm_gated(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate, self.bias)


def mamba_split_conv1d_scan_combined(
    zxbcdt: Tensor,
    conv1d_weight: Tensor,
    conv1d_bias: Optional[Tensor],
    dt_bias: Tensor,
    A: Tensor,
    D: Tensor,
    chunk_size: int,
    initial_states: Optional[Tensor] = None,
    seq_idx: Optional[Tensor] = None,
    dt_limit: tuple[float, float] = _NO_LIMIT,
    return_final_states: bool = False,
    activation: str = "silu",
    rmsnorm_weight: Optional[Tensor] = None,
    rmsnorm_eps: float = 1e-6,
    outproj_weight: Optional[Tensor] = None,
    outproj_bias: Optional[Tensor] = None,
    headdim: Optional[int] = None,
    ngroups: int = 1,
    norm_before_gate: bool = True,
    **unused,
):
    """mamba-ssm's fused Mamba-2 block body: zxbcdt [b, l, 2*d_nonssm + d + (d + 2*g*n) + h] is
    split into an optional ungated MLP part, the gate z, the conv input xBC and dt; xBC goes
    through the causal conv + activation, x/B/C into the scan (gated by z unless an RMSNorm weight
    is given, then the gated norm does it), then the optional output projection. Out [b, l, d']."""
    heads = A.shape[0]
    if D.dim() == 1:
        if headdim is None:
            raise ValueError("headdim is required when D has one entry per head")
        dim = heads * headdim
    else:
        headdim, dim = D.shape[1], D.numel()
    dstate = (conv1d_weight.shape[0] - dim) // ngroups // 2
    d_nonssm = (zxbcdt.shape[-1] - 2 * dim - 2 * ngroups * dstate - heads) // 2
    if d_nonssm < 0:
        raise ValueError(
            f"zxbcdt has {zxbcdt.shape[-1]} channels, too few for d={dim}, groups={ngroups}, state={dstate}"
        )
    zx0, z, xBC, dt = torch.split(zxbcdt, [2 * d_nonssm, dim, dim + 2 * ngroups * dstate, heads], dim=-1)
    xBC = causal_conv1d_fn(
        xBC.transpose(1, 2), conv1d_weight, conv1d_bias, seq_idx=seq_idx, activation=activation
    ).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    b, length = x.shape[:2]
    result = mamba_chunk_scan_combined(
        x.reshape(b, length, heads, headdim),
        dt,
        A,
        B.reshape(b, length, ngroups, dstate),
        C.reshape(b, length, ngroups, dstate),
        chunk_size,
        D=D,
        z=z.reshape(b, length, heads, headdim) if rmsnorm_weight is None else None,
        dt_bias=dt_bias,
        initial_states=initial_states,
        seq_idx=seq_idx,
        dt_softplus=True,
        dt_limit=dt_limit,
        return_final_states=return_final_states,
    )
    y, final = result if return_final_states else (result, None)
    y = y.reshape(b, length, dim)
    if rmsnorm_weight is not None:
        y = rms_norm_gated(
            y, rmsnorm_weight, z, rmsnorm_eps, group_size=dim // ngroups, norm_before_gate=norm_before_gate
        )
    if d_nonssm > 0:
        x0, z0 = torch.split(zx0, [d_nonssm, d_nonssm], dim=-1)
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    if outproj_weight is not None:
        y = F.linear(y, outproj_weight, outproj_bias)
    return (y, final) if return_final_states else y


def ssd_recurrence(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """The SSD recurrence one step at a time (the definition in the module docstring, in the
    inputs' dtype, e.g. float64): the yardstick the chunked scan is tested against. dt is the
    final step size (softplus / bias already applied); shapes as mamba_chunk_scan_combined."""
    b, length, heads, p = x.shape
    reps = heads // B.shape[2]
    Bh, Ch = B.repeat_interleave(reps, dim=2), C.repeat_interleave(reps, dim=2)
    state = initial_state.clone() if initial_state is not None else x.new_zeros(b, heads, p, B.shape[-1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", state, Ch[:, t])
        if D is not None:
            y = y + x[:, t] * (D[:, None] if D.dim() == 1 else D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


__all__ = [
    "RMSNormGated",
    "causal_conv1d_fn",
    "mamba_chunk_scan_combined",
    "mamba_split_conv1d_scan_combined",
    "rms_norm_gated",
    "ssd_recurrence",
]
