"""The rank schedule against independent references: the formula written out here, and
lycoris-lora's own ``compute_timestep_mask`` (what SimpleTuner runs); property tests with hypothesis.
The README's table must be what the code computes."""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from devkit.host import ROOT, pack_module

sched = pack_module("tlora_core.schedule")
runtime = pack_module("tlora_core.runtime")

ranks = st.integers(1, 256)
alphas = st.floats(0.05, 8.0, allow_nan=False, allow_infinity=False)


@st.composite
def schedules(draw):
    R = draw(ranks)
    return sched.Schedule(max_rank=R, min_rank=draw(st.integers(0, R)), alpha=draw(alphas),
                          max_timestep=draw(st.sampled_from([1000, 1000, 500, 1])))


def formula(t, R, r_min, alpha, T, truncate=True):
    """The trainers' formula, written out from the spec."""
    if truncate:
        t = float(int(t))
    u = min(max((T - t) / T, 0.0), 1.0)
    return min(R, int(math.floor(u ** alpha * (R - r_min))) + r_min)


@settings(max_examples=300, deadline=None)
@given(schedules(), st.floats(-10, 1100, allow_nan=False))
def test_rank_is_the_formula(s, t):
    assert sched.rank_at_timestep(t, s) == formula(t, s.max_rank, s.min_rank, s.alpha, s.max_timestep)


@settings(max_examples=300, deadline=None)
@given(schedules(), st.data())
def test_rank_is_lycoris_compute_timestep_mask(s, data):
    """SimpleTuner's mask = lycoris' compute_timestep_mask(int(t), T, R, r_min, alpha)."""
    from lycoris.modules.tlora import compute_timestep_mask

    t = data.draw(st.integers(0, s.max_timestep))
    ref = compute_timestep_mask(t, s.max_timestep, s.max_rank, s.min_rank, s.alpha)
    mask = runtime.prefix_mask([sched.rank_at_timestep(t, s)], 1)
    mask = torch.cat([mask, mask.new_zeros(1, s.max_rank - mask.shape[1])], 1)
    assert torch.equal(mask, ref)


@settings(max_examples=200, deadline=None)
@given(schedules(), st.lists(st.integers(1, 256), min_size=1, max_size=4), st.floats(0, 1000, allow_nan=False))
def test_module_ranks_follow_the_trainers_rule(s, module_ranks, t):
    """Modules of other ranks R_m: LyCORIS cuts one mask of length R (``mask[:, :lora_dim]``,
    lycoris.modules.tlora ``_get_mask``), the kohya-style trainers build each module's mask from its own
    rank (sd-scripts fork ``build_rank_mask(progress, rank, min_rank)``, min_rank clamped to it)."""
    from lycoris.modules.tlora import compute_timestep_mask

    module_ranks = [min(R, s.max_rank) for R in module_ranks]
    ti = min(int(t), int(s.max_timestep))
    shared = sched.ranks_by_module_rank(lambda x: sched.ranks_for_timesteps([ti], x), s, module_ranks)
    for R in module_ranks:
        cut = compute_timestep_mask(ti, s.max_timestep, s.max_rank, s.min_rank, s.alpha)[:, :R]
        assert shared[R] == [int(cut.sum())]
    own = dataclasses.replace(s, per_module_rank=True)
    per_module = sched.ranks_by_module_rank(lambda x: sched.ranks_for_timesteps([ti], x), own, module_ranks)
    for R in module_ranks:
        assert per_module[R] == [formula(ti, R, min(s.min_rank, R), s.alpha, s.max_timestep)]


@settings(max_examples=200, deadline=None)
@given(schedules(), st.floats(0, 1000, allow_nan=False), st.floats(0, 1000, allow_nan=False))
def test_rank_is_bounded_and_monotone(s, t1, t2):
    r1, r2 = sched.rank_at_timestep(t1, s), sched.rank_at_timestep(t2, s)
    assert s.min_rank <= r1 <= s.max_rank
    if t1 <= t2:  # more noise, fewer ranks
        assert r1 >= r2
    assert sched.rank_at_timestep(0, s) == s.max_rank  # clean image: every rank


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 200), st.integers(0, 200), st.integers(0, 2000), st.integers(1, 2000))
def test_exact_boundaries_in_rational_arithmetic(R, r_min, t, T):
    """With alpha = 1 the rank is floor((T - t) * (R - r_min) / T) + r_min exactly, except where the
    float product lands a rounding error below an integer (then both the trainers and we round down)."""
    assume(r_min <= R and t <= T)
    s = sched.Schedule(max_rank=R, min_rank=r_min, alpha=1.0, max_timestep=T)
    exact = math.floor(Fraction(T - t, T) * (R - r_min)) + r_min
    got = sched.rank_at_timestep(t, s)
    assert got in (exact, exact - 1)
    assert got == formula(t, R, r_min, 1.0, T)


def test_float_timestep_when_not_truncated():
    s = sched.Schedule(max_rank=64, truncate_timestep=False)
    assert sched.rank_at_timestep(999.9, s) == formula(999.9, 64, 1, 1.0, 1000, truncate=False)
    assert sched.rank_at_timestep(250.5, s) == 48 and sched.rank_at_timestep(250.5, sched.Schedule(max_rank=64)) == 48
    assert sched.rank_at_timestep(984.2, s) == 1 and sched.rank_at_timestep(984.2, sched.Schedule(max_rank=64)) == 2


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 64), min_size=1, max_size=8))
def test_masks_are_prefixes(rs):
    m = runtime.prefix_mask(rs, 2)  # 2 columns per rank (ortho / LyCORIS adapters)
    assert m.shape == (len(rs), 2 * max(rs))
    for row, r in zip(m, rs):
        k = 2 * r
        assert row.sum().item() == k and (k == 0 or row[:k].min() == 1) and (k == m.shape[1] or row[k:].max() == 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.01, 20, allow_nan=False), min_size=2, max_size=30, unique=True), st.data())
def test_step_index_locates_sigma_in_the_schedule(raw, data):
    sig = sorted(raw, reverse=True) + [0.0]
    n = len(sig) - 1
    i = data.draw(st.integers(0, n - 1))
    assert sched.step_index(sig[i], sig) == i  # a scheduled sigma is its own step
    frac = data.draw(st.floats(0.01, 0.99))
    mid = sig[i] - frac * (sig[i] - sig[i + 1])  # Heun / DPM2 evaluate between scheduled sigmas
    # within the round-off tolerance (1e-6 relative) a sigma *is* the scheduled one; between means beyond it
    tol = 1e-6 * max(1.0, sig[0])
    assume(sig[i + 1] + tol < mid < sig[i] - tol)
    assert sched.step_index(mid, sig) == i


def test_step_index_schedule_is_the_formula_in_step_units():
    s = sched.Schedule(max_rank=16, min_rank=2, alpha=1.5, mode=sched.STEP_INDEX)
    n = 10
    for i in range(n):
        u = i / n
        assert sched.rank_at_step(i, n, s) == min(16, math.floor(u ** 1.5 * 14) + 2)
    assert sched.rank_at_step(0, n, s) == 2


def markdown_rank_table(alphas=(0.5, 1.0, 2.0), timesteps=(0, 250, 500, 750, 999)) -> str:
    """README's rank table (R = 64, min_rank 1, T = 1000), from ``rank_at_timestep``."""
    head = "| alpha | " + " | ".join(f"t={t:g}" for t in timesteps) + " |"
    rows = [f"| {a:g} | " + " | ".join(str(r) for _, r in sched.rank_table(sched.Schedule(max_rank=64, alpha=a), timesteps))
            + " |" for a in alphas]
    return "\n".join([head, "|---|" + "---|" * len(timesteps)] + rows)


def test_seed_table_was_wrong_and_readme_table_is_generated():
    table = markdown_rank_table()
    assert "| 2 | 64 | 36 | 16 | 4 | 1 |" in table  # not the seeds' 64, 60, 48, 20, 1
    assert "| 0.5 | 64 | 55 | 45 | 32 | 2 |" in table  # not the seeds' 64, 55, 46, 33, 1
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"## Schedule table\n(.*?)(?=\n## |\Z)", readme, re.S)
    assert section, "README lacks the 'Schedule table' section"
    assert table in section.group(1)


def test_schedule_validation():
    with pytest.raises(ValueError):
        sched.Schedule(max_rank=4, min_rank=5)
    with pytest.raises(ValueError):
        sched.Schedule(max_rank=4, alpha=0)
    s = sched.Schedule(max_rank=4).with_overrides("file metadata", min_rank=2, alpha=None)
    assert s.min_rank == 2 and s.sources == {"min_rank": "file metadata"}
