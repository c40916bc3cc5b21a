"""Host-free runtime maths (tlora_core.runtime) against the explicit weight delta."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from devkit.host import ROOT, pack_module

rt = pack_module("tlora_core.runtime")
adapter = pack_module("tlora_core.adapter")


def _ortho(out_f=12, in_f=10, R=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return adapter.ortho("m", r(out_f, R), r(R).abs(), r(R, in_f), r(out_f, R), r(R).abs(), r(R, in_f), scale=0.5)


def test_runtime_is_host_free():
    code = ("import sys; sys.path.insert(0, %r); import tlora_core.runtime;"
            "assert not any(m == 'comfy' or m.startswith('comfy.') for m in sys.modules)" % str(ROOT))
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("r", [0, 1, 3, 4])
@pytest.mark.parametrize("sliced", [False, True])
def test_add_lowrank_equals_explicit_delta(r, sliced):
    ad = _ortho()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 10, generator=g)
    width = 30 if sliced else 12
    out0 = torch.randn(2, 5, width, generator=g)
    sl = (7, 12) if sliced else None
    want = out0.clone()
    delta = ad.delta_weight(r)  # (out, in) with r ranks on: both ortho terms of each rank
    (want[..., 7:19] if sliced else want).add_(-0.7 * x @ delta.T)

    got = rt.add_lowrank_(out0.clone(), x, ad.down, ad.up, r * ad.group, -0.7, sl)
    assert torch.allclose(got, want, atol=1e-5)
    fast = out0.clone()
    rt.add_prefix_2d_(fast.view(-1, width), x.reshape(-1, 10), rt.Prepared(ad.down, ad.up), r * ad.group, -0.7, sl)
    assert torch.allclose(fast, want, atol=1e-5)
    # a non-contiguous output takes the general path, same numbers
    nc = out0.clone().transpose(0, 1).contiguous().transpose(0, 1)
    assert not nc.is_contiguous()
    assert torch.allclose(rt.add_lowrank_(nc, x, ad.down, ad.up, r * ad.group, -0.7, sl), want, atol=1e-5)
    if sliced:  # nothing outside the slice moves
        assert torch.equal(got[..., :7], out0[..., :7]) and torch.equal(got[..., 19:], out0[..., 19:])


def test_per_sample_masks():
    ad = _ortho()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 5, 10, generator=g)  # batch 3 with 2 rows per sample folded in (e.g. frames)
    out0 = torch.randn(6, 5, 12, generator=g)
    ranks = [1, 4, 2]
    mask = rt.prefix_mask(ranks, ad.group)
    assert mask.shape == (3, 8) and mask.sum(1).tolist() == [2, 8, 4]
    got = rt.add_lowrank_per_sample_(out0.clone(), x, ad.down, ad.up, mask, 1.3)
    for i, r in enumerate(ranks):
        rows = slice(2 * i, 2 * i + 2)
        want = out0[rows] + 1.3 * x[rows] @ ad.delta_weight(r).T
        assert torch.allclose(got[rows], want, atol=1e-5), i
    with pytest.raises(RuntimeError, match="not a multiple"):
        rt.add_lowrank_per_sample_(torch.zeros(4, 5, 12), x[:4], ad.down, ad.up, mask, 1.0)


@pytest.mark.parametrize("geometry", [dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)),
                                      dict(kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1)),
                                      dict(kernel_size=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1))])
def test_conv_adapter_is_a_conv_by_the_flattened_delta(geometry):
    """On a convolution: the adapter added at the output equals the conv of the input by the weight
    delta reshaped to (out, in, kh, kw), with the layer's stride and padding; per sample too."""
    import torch.nn.functional as F

    kh, kw = geometry["kernel_size"]
    ad = _ortho(out_f=12, in_f=6 * kh * kw, R=4, seed=5)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 6, 9, 9, generator=g)
    conv = lambda w: F.conv2d(x, w, None, geometry["stride"], geometry["padding"], geometry["dilation"])
    out0 = torch.randn(conv(torch.zeros(12, 6, kh, kw)).shape, generator=g)
    for r in (0, 1, 3, 4):
        got = rt.add_lowrank_conv_(out0.clone(), x, ad.down, ad.up, r * ad.group, 0.6, geometry)
        want = out0 + 0.6 * conv(ad.delta_weight(r).reshape(12, 6, kh, kw))
        assert torch.allclose(got, want, atol=1e-5), r
    ranks = [1, 4, 2]
    mask = rt.prefix_mask(ranks, ad.group)
    got = rt.add_lowrank_conv_(out0.clone(), x, ad.down, ad.up, mask.shape[1], 0.6, geometry, mask)
    for i, r in enumerate(ranks):
        want = out0[i] + 0.6 * conv(ad.delta_weight(r).reshape(12, 6, kh, kw))[i]
        assert torch.allclose(got[i], want, atol=1e-5), i


def test_merged_weight_follows_a_rank_sequence():
    """``merge_prefix_`` over a run's rank sequence (growing, repeated, shrinking, off, back on):
    at each step the weight is base + strength * delta_weight(r) (float64 reference), and the
    shrinking and off steps recompute from the untouched copy exactly."""
    ad = _ortho(out_f=24, in_f=20, R=6)
    base = torch.randn(24, 20, generator=torch.Generator().manual_seed(3))
    w, prepared, carried = base.clone(), rt.Prepared(ad.down, ad.up), 0
    for r in (1, 3, 3, 6, 2, 0, 4):
        rt.merge_prefix_(w, base, prepared, r * ad.group, 0.8, carried * ad.group)
        carried = r
        want = base.double() + 0.8 * ad.delta_weight(r).double()
        assert torch.allclose(w.double(), want, atol=1e-5, rtol=0), r
        if r in (2, 0):  # from the copy: exactly the one-GEMM result
            exact = base.clone() if r == 0 else torch.addmm(base, ad.up[:, :r * ad.group], ad.down[:r * ad.group], alpha=0.8)
            assert torch.equal(w, exact), r


def test_half_precision_merges_always_round_once():
    """In bf16 a growing rank is not added onto the weight (each sum would round at bf16): after
    ranks 1, 3, 6 the weight is bit-equal to one merge from the copy, as ComfyUI's own merge of
    the masked adapter would round it once."""
    ad = _ortho(out_f=24, in_f=20, R=6)
    base = torch.randn(24, 20, generator=torch.Generator().manual_seed(4)).bfloat16()
    up, down = ad.up.bfloat16(), ad.down.bfloat16()
    w, prepared, carried = base.clone(), rt.Prepared(down, up), 0
    for r in (1, 3, 6):
        rt.merge_prefix_(w, base, prepared, r * ad.group, 0.8, carried * ad.group)
        carried = r
    k = 6 * ad.group
    assert torch.equal(w, torch.addmm(base, up[:, :k], down[:k], alpha=0.8))
