"""The nodes in-process (real ComfyUI classes, tiny real models): T-LoRA Schedule and the preview."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from devkit.host import pack_module


@pytest.fixture(scope="module")
def nodes(comfy):
    """The schedule and preview nodes' modules, as one namespace."""
    import types

    return types.SimpleNamespace(**{**vars(pack_module("nodes.schedule")), **vars(pack_module("nodes.preview"))})


@pytest.fixture(scope="module")
def core():
    return pack_module("tlora_core.schedule")


def test_a_max_rank_set_on_the_node_is_one_mask_for_every_module(nodes, core):
    """A file whose trainer masks each module by its own rank: the node's max_rank 0 keeps that rule,
    a max_rank set there is the one mask length of every module (each capped at its own rank)."""
    sched, ScheduleOverrides = core, nodes.ScheduleOverrides
    base = sched.Schedule(max_rank=16, min_rank=2, per_module_rank=True)
    keep = ScheduleOverrides(max_rank=None, min_rank=2, alpha=1.0, mode=sched.TIMESTEP, max_timestep=1000)
    assert keep.resolve(base).per_module_rank
    cap = ScheduleOverrides(max_rank=8, min_rank=2, alpha=1.0, mode=sched.TIMESTEP, max_timestep=1000).resolve(base)
    assert not cap.per_module_rank and cap.sources["per_module_rank"] == "T-LoRA Schedule node"
    by_rank = sched.ranks_by_module_rank(lambda x: sched.ranks_for_timesteps([500], x), cap, [4, 16])
    assert by_rank == {4: [4], 16: [5]}  # r(500) = floor(0.5 * 6) + 2 = 5 of the node's R = 8, capped at 4


def file_schedule(core, **kw):
    values = dict(max_rank=32, min_rank=2, alpha=2.0, mode="timestep", max_timestep=1000)
    values.update(kw)
    return core.Schedule(**values, sources={k: "file metadata" for k in values})


def make_overrides(nodes, **kw):
    values = dict(max_rank=0, min_rank=1, alpha=1.0, mode="timestep", max_timestep=1000)
    values.update(kw)
    return nodes.TLoraSchedule.execute(**values).args[0]


def test_schedule_node_overrides_the_file_and_says_so(nodes, core):
    base = file_schedule(core)
    eff = make_overrides(nodes, max_rank=0, min_rank=4, alpha=0.5, mode="step_index", max_timestep=500).resolve(base)
    assert (eff.max_rank, eff.min_rank, eff.alpha, eff.mode, eff.max_timestep) == (32, 4, 0.5, "step_index", 500)
    assert eff.sources["max_rank"] == "file metadata"  # 0 = keep the file's rank
    for name in ("min_rank", "alpha", "mode", "max_timestep"):
        assert eff.sources[name] == "T-LoRA Schedule node"
    assert "max_rank=32 (file metadata)" in eff.describe() and "alpha=0.5 (T-LoRA Schedule node)" in eff.describe()

    capped = make_overrides(nodes, max_rank=16).resolve(base)
    assert capped.max_rank == 16 and capped.sources["max_rank"] == "T-LoRA Schedule node"


def test_schedule_node_rejects_impossible_values(nodes, core):
    with pytest.raises(ValueError, match="min_rank 8 is above max_rank 4"):
        make_overrides(nodes, max_rank=4, min_rank=8)
    with pytest.raises(ValueError, match=r"exceeds the rank of my\.safetensors \(32\)"):
        make_overrides(nodes, max_rank=64).resolve(file_schedule(core), "my.safetensors")
    with pytest.raises(ValueError, match="min_rank 40 is above max_rank 32"):
        make_overrides(nodes, min_rank=40).resolve(file_schedule(core))


def test_preview_sigmas_are_ksamplers(nodes, comfy, tiny_sdxl, tiny_flux):
    import comfy.samplers

    for model in (tiny_sdxl, tiny_flux):
        for sampler, scheduler, steps, denoise in [("euler", "normal", 12, 1.0), ("dpm_2", "karras", 7, 1.0),
                                                   ("euler", "simple", 10, 0.6)]:
            got = nodes.sampler_sigmas(model, sampler, scheduler, steps, denoise)
            want = comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler=sampler, scheduler=scheduler,
                                           denoise=denoise).sigmas
            assert torch.equal(got, want.float())
            assert len(got) == steps + 1


def _discrete_timestep(model, sigma: float) -> int:
    log_sigmas = np.log(model.get_model_object("model_sampling").sigmas.double().numpy())
    return int(np.abs(math.log(sigma) - log_sigmas).argmin())


def test_preview_ranks_per_step_sdxl_and_flux(nodes, core, tiny_sdxl, tiny_flux):
    sch = make_overrides(nodes, max_rank=16, min_rank=1, alpha=2.0)
    for model, to_t in ((tiny_sdxl, lambda s: _discrete_timestep(tiny_sdxl, s)), (tiny_flux, lambda s: 1000.0 * s)):
        out = nodes.TLoraSchedulePreview.execute(model, "euler", "normal", 10, 1.0, schedule=sch)
        image, table = out.args
        sigmas = nodes.sampler_sigmas(model, "euler", "normal", 10, 1.0)
        want = []
        for s in sigmas[:-1].tolist():
            t = int(to_t(s))  # LyCORIS truncates t
            u = min(max((1000 - t) / 1000, 0.0), 1.0)
            want.append(min(16, math.floor(u ** 2.0 * 15) + 1))
        rows = [line.split() for line in table.splitlines()[1:11]]
        assert [int(r[0]) for r in rows] == list(range(10))
        assert [r[-1] for r in rows] == [f"{w}/16" for w in want]
        assert want[0] == 1 and want[-1] > want[0]  # few ranks at high noise, more near the clean image
        assert image.shape == (1, 432, 768, 3) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0


def test_preview_chart_draws_the_ranks(nodes):
    chart = pack_module("tlora_core.chart")
    ranks = [1, 1, 2, 4, 8, 12, 16]
    img = (chart.rank_chart([chart.Series("s", ranks, 16)], title="t")[0].numpy() * 255).round().astype(int)
    color = np.array(chart.PALETTE[0])
    # geometry of rank_chart: plot box [56, 768-20] x [74, 432-56]
    left, right, top, bottom = 56, 748, 74, 376
    for i, r in enumerate(ranks):
        x = int(left + (right - left) * (i + 0.5) / len(ranks))
        y = bottom - (bottom - top) * r / 16
        column = img[:, x]
        hits = np.nonzero((np.abs(column - color) <= 8).all(axis=1))[0]
        assert len(hits) and abs(np.median(hits) - y) <= 4, (i, r, y, hits)
    other = chart.rank_chart([chart.Series("s", [16] * 7, 16)], title="t")
    assert not torch.equal(torch.from_numpy(img / 255.0).float(), other[0])


def test_preview_step_index_mode(nodes, core, tiny_flux):
    sch = make_overrides(nodes, max_rank=8, min_rank=1, alpha=1.0, mode="step_index")
    _, table = nodes.TLoraSchedulePreview.execute(tiny_flux, "heun", "simple", 8, 1.0, schedule=sch).args
    ranks = [int(line.split()[-1].split("/")[0]) for line in table.splitlines()[1:9]]
    assert ranks == [core.rank_at_step(i, 8, core.Schedule(max_rank=8)) for i in range(8)] == [1, 1, 2, 3, 4, 5, 6, 7]


def test_preview_needs_something_to_chart(nodes, tiny_sdxl):
    with pytest.raises(ValueError, match="connect a T-LoRA Schedule"):
        nodes.TLoraSchedulePreview.execute(tiny_sdxl, "euler", "normal", 4, 1.0)
    with pytest.raises(ValueError, match="max_rank is 0"):
        nodes.TLoraSchedulePreview.execute(tiny_sdxl, "euler", "normal", 4, 1.0, schedule=make_overrides(nodes))
    with pytest.raises(ValueError, match="no steps"):
        nodes.TLoraSchedulePreview.execute(tiny_sdxl, "euler", "normal", 4, 0.0,
                                           schedule=make_overrides(nodes, max_rank=4))


def _with_tlora(model, name, schedule, strength=1.0):
    """``model`` with a small T-LoRA really attached by the runtime (one adapter on one attention layer)."""
    adapter = pack_module("tlora_core.adapter")
    patcher = pack_module("comfy_glue.patcher")
    path = "middle_block.1.transformer_blocks.0.attn1.to_q"
    layer = model.get_model_object("diffusion_model").get_submodule(path)
    gen = torch.Generator().manual_seed(0)
    ad = adapter.plain(name, torch.randn(layer.out_features, schedule.max_rank, generator=gen),
                       torch.randn(schedule.max_rank, layer.in_features, generator=gen), 0.1)
    return patcher.apply_tlora(model, [adapter.BoundAdapter(path, None, ad)], schedule, strength, name)


def test_preview_charts_the_tloras_on_the_model(nodes, core, tiny_sdxl):
    """A model from T-LoRA Loaders carries its T-LoRAs: the preview charts each, with its schedule in effect."""
    model = _with_tlora(tiny_sdxl, "a.safetensors", file_schedule(core, max_rank=8, alpha=1.0))
    model = _with_tlora(model, "b.safetensors", file_schedule(core, max_rank=4, alpha=3.0), 0.5)
    assert [(t.name, t.schedule.max_rank, t.strength) for t in nodes.loaded_tloras(model)] == \
        [("a.safetensors", 8, 1.0), ("b.safetensors", 4, 0.5)]
    assert nodes.loaded_tloras(tiny_sdxl) == []  # the input model is untouched
    _, table = nodes.TLoraSchedulePreview.execute(model, "euler", "normal", 6, 1.0).args
    head = table.splitlines()[0]
    assert "rank: a.safetensors" in head and "rank: b.safetensors" in head
    last = table.splitlines()[6].split()
    assert last[-2].endswith("/8") and last[-1].endswith("/4")
    # with one T-LoRA on the model, a schedule input's max_rank 0 takes that T-LoRA's rank
    one = _with_tlora(tiny_sdxl, "a.safetensors", file_schedule(core, max_rank=8))
    _, table = nodes.TLoraSchedulePreview.execute(one, "euler", "normal", 6, 1.0, schedule=make_overrides(nodes)).args
    assert "rank: schedule input on a.safetensors" in table and table.splitlines()[6].split()[-1].endswith("/8")


def test_preview_of_a_boundary_schedule_with_an_offset(nodes, tiny_flux):
    """takenoko's schedule set on the node (boundary 875, t = 1000 sigma + 1, not truncated): every
    rank up to the boundary, then down to min_rank at T; the table shows the trainer's t."""
    sch = make_overrides(nodes, max_rank=16, min_rank=1, alpha=1.0, boundary_timestep=875.0, timestep_offset=1.0,
                         truncate_t="none")
    _, table = nodes.TLoraSchedulePreview.execute(tiny_flux, "euler", "simple", 12, 1.0, schedule=sch).args
    sigmas = nodes.sampler_sigmas(tiny_flux, "euler", "simple", 12, 1.0)[:-1].tolist()
    rows = [line.split() for line in table.splitlines()[1:13]]
    want = []
    for s in sigmas:
        t = 1000.0 * s + 1.0
        frac = 1.0 if t <= 875 else min(max(1 - (t - 875) / 125, 0.0), 1.0)
        want.append(math.floor(frac * 15 + 1))
    assert [r[-1] for r in rows] == [f"{w}/16" for w in want]
    assert [float(r[2]) for r in rows] == pytest.approx([1000.0 * s + 1.0 for s in sigmas], rel=1e-4)
    assert want[0] < 16 and want.count(16) >= 6  # reduced above the boundary only
