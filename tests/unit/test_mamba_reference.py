"""The torch reference Mamba-2 kernels (nemo_igrpo/policy/mamba_reference.py) that replace
mamba-ssm / causal-conv1d on machines without CUDA: against a float64 step-by-step recurrence,
against transformers' own pure-torch Nemotron-H mixer, and the sequence-boundary rule packed
micro-batches rely on (seq_idx). Also: cpu_compat installs them into megatron's mixer module
only, and disable() restores it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemo_igrpo.policy import mamba_reference as ref


def _inputs(b=2, length=45, heads=4, p=8, groups=2, n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, heads, p, generator=g, dtype=dtype)
    dt = F.softplus(torch.randn(b, length, heads, generator=g, dtype=dtype) - 1.0)
    A = -torch.rand(heads, generator=g, dtype=dtype) * 2 - 0.1
    B = torch.randn(b, length, groups, n, generator=g, dtype=dtype)
    C = torch.randn(b, length, groups, n, generator=g, dtype=dtype)
    D = torch.randn(heads, generator=g, dtype=dtype)
    return x, dt, A, B, C, D


@pytest.mark.parametrize("chunk", [1, 7, 16, 64])
def test_chunked_scan_equals_the_recurrence(chunk):
    x, dt, A, B, C, D = _inputs()
    init = torch.randn(2, 4, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    want_y, want_state = ref.ssd_recurrence(x, dt, A, B, C, D, initial_state=init)
    y, state = ref.mamba_chunk_scan_combined(
        x.float(),
        dt.float(),
        A.float(),
        B.float(),
        C.float(),
        chunk,
        D=D.float(),
        initial_states=init.float(),
        return_final_states=True,
    )
    torch.testing.assert_close(y.double(), want_y, rtol=0, atol=2e-5)
    torch.testing.assert_close(state.double(), want_state, rtol=0, atol=2e-5)


def test_seq_idx_restarts_scan_and_convolution_at_each_boundary():
    x, dt, A, B, C, D = _inputs(b=1, length=40)
    bounds = [0, 13, 14, 31, 40]  # a one-token sequence and a trailing "padding" segment included
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor([13, 1, 17, 9]))[None].int()
    y = ref.mamba_chunk_scan_combined(
        x.float(), dt.float(), A.float(), B.float(), C.float(), 8, D=D.float(), seq_idx=seq_idx
    )
    g = torch.Generator().manual_seed(1)
    conv_in = torch.randn(1, 5, 40, generator=g)
    w, bias = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    conv = ref.causal_conv1d_fn(conv_in, w, bias, seq_idx=seq_idx, activation="silu")
    for s, e in zip(bounds[:-1], bounds[1:]):
        want, _ = ref.ssd_recurrence(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D)
        torch.testing.assert_close(y[:, s:e].double(), want, rtol=0, atol=2e-5, msg=f"scan, segment {s}:{e}")
        alone = F.silu(F.conv1d(conv_in[:, :, s:e], w[:, None], bias, padding=3, groups=5)[:, :, : e - s])
        torch.testing.assert_close(conv[:, :, s:e], alone, rtol=0, atol=1e-5, msg=f"conv, segment {s}:{e}")


def test_causal_conv_matches_torch_conv1d():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(2, 6, 20, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    want = F.conv1d(x, w[:, None], b, padding=3, groups=6)[:, :, :20]
    torch.testing.assert_close(ref.causal_conv1d_fn(x, w, b), want, rtol=0, atol=1e-5)


def _hf_mixer(seed=0):
    """transformers' NemotronHMamba2Mixer with random weights (no mamba-ssm here: its torch path)."""
    from transformers import NemotronHConfig
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    cfg = NemotronHConfig(
        hidden_size=32,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=6,
        chunk_size=8,
        conv_kernel=4,
        hybrid_override_pattern="M",
        vocab_size=16,
    )
    torch.manual_seed(seed)
    mixer = NemotronHMamba2Mixer(cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in mixer.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if "proj" in name else 0.5) + (1.0 if name == "norm.weight" else 0.0))
        mixer.dt_bias.copy_(torch.rand(8) - 2.0)
    return mixer.eval()


def test_fused_block_matches_transformers_mixer():
    """The exact call transformers makes to mamba-ssm's fused kernel (its training path), answered
    by the reference, against transformers' own unfused torch path on the same weights."""
    mixer = _hf_mixer()
    h = torch.randn(2, 27, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = mixer(h)
        got = ref.mamba_split_conv1d_scan_combined(
            mixer.in_proj(h),
            mixer.conv1d.weight.squeeze(1),
            mixer.conv1d.bias,
            mixer.dt_bias,
            -torch.exp(mixer.A_log.float()),
            D=mixer.D,
            chunk_size=mixer.chunk_size,
            activation="silu",
            rmsnorm_weight=mixer.norm.weight,
            rmsnorm_eps=mixer.norm.variance_epsilon,
            outproj_weight=mixer.out_proj.weight,
            outproj_bias=mixer.out_proj.bias,
            headdim=mixer.head_dim,
            ngroups=mixer.n_groups,
            norm_before_gate=False,
            dt_limit=mixer.time_step_limit,
        )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_megatron_style_split_gate_then_norm_equals_fused_norm():
    """megatron calls the fused kernel without the norm weight (the gate is applied inside) and
    then its gated RMSNorm without z: the same function as the norm fused with the gate."""
    mixer = _hf_mixer(seed=1)
    h = torch.randn(1, 19, 32, generator=torch.Generator().manual_seed(5))
    common = dict(
        conv1d_weight=mixer.conv1d.weight.squeeze(1),
        conv1d_bias=mixer.conv1d.bias,
        dt_bias=mixer.dt_bias,
        A=-torch.exp(mixer.A_log.float()),
        D=mixer.D,
        chunk_size=8,
        headdim=8,
        ngroups=2,
        norm_before_gate=False,
    )
    with torch.no_grad():
        zxbcdt = mixer.in_proj(h)
        fused = ref.mamba_split_conv1d_scan_combined(
            zxbcdt, rmsnorm_weight=mixer.norm.weight, rmsnorm_eps=1e-5, **common
        )
        norm = ref.RMSNormGated(64, eps=1e-5, group_size=32, norm_before_gate=False)
        norm.weight.copy_(mixer.norm.weight)
        split = norm(ref.mamba_split_conv1d_scan_combined(zxbcdt, **common))
    torch.testing.assert_close(split, fused, rtol=0, atol=1e-6)


def test_gated_norm_matches_transformers():
    from transformers.models.zamba2.modeling_zamba2 import Zamba2RMSNormGated

    theirs = Zamba2RMSNormGated(24, group_size=8, eps=1e-5)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(24, generator=torch.Generator().manual_seed(7)))
    ours = ref.RMSNormGated(24, eps=1e-5, group_size=8, norm_before_gate=False)
    ours.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 24, generator=g)
    torch.testing.assert_close(ours(x, z), theirs(x, z), rtol=0, atol=1e-6)


def test_reference_gradients_flow():
    x, dt, A, B, C, D = (t.float().requires_grad_() for t in _inputs(b=1, length=20))
    y = ref.mamba_chunk_scan_combined(x, dt, A, B, C, 8, D=D, seq_idx=torch.tensor([[0] * 9 + [1] * 11]))
    y.square().sum().backward()
    for t in (x, dt, A, B, C, D):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_install_patches_megatron_mixer_only_and_disable_restores():
    import sys

    import megatron.core.ssm.mamba_mixer as mixer

    from nemo_igrpo.policy import cpu_compat

    before = (mixer.mamba_split_conv1d_scan_combined, mixer.HAVE_MAMBA_SSM, mixer.ExtendedRMSNorm)
    try:
        assert cpu_compat.install_mamba_reference_kernels()
        assert cpu_compat.install_mamba_reference_kernels()  # idempotent
        assert mixer.mamba_split_conv1d_scan_combined is ref.mamba_split_conv1d_scan_combined
        assert mixer.HAVE_MAMBA_SSM and mixer._check_mamba_sequence_packing_support(False) == (True, None)
        # Nothing importable under the real packages' names: transformers keeps its torch path.
        assert "mamba_ssm" not in sys.modules and "causal_conv1d" not in sys.modules
    finally:
        cpu_compat.disable()
    assert (mixer.mamba_split_conv1d_scan_combined, mixer.HAVE_MAMBA_SSM, mixer.ExtendedRMSNorm) == before
