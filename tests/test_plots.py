"""q3lab.viz.plots: byte-identical saves, plotted values equal the metric frames, figures from a synthetic trace."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import q3lab
from q3lab.analysis import cachesim, metrics
from q3lab.viz import plots
from q3lab.errors import InputError
from q3lab.analysis.lens import logit_lens
from q3lab.runtime.recording import record


@pytest.fixture(scope="module")
def trace_and_model(tmp_path_factory):
    from q3lab.weights.synthetic import synth
    path = synth(tmp_path_factory.mktemp("synth") / "ckpt", preset="tiny", seed=1)
    model = q3lab.load(path)
    g = torch.Generator().manual_seed(0)
    with record(model) as rec:
        for n, dom in enumerate(["code", "code", "poetry", "poetry"]):
            rec.set_prompt(n, domain=dom)
            model.generate(torch.randint(0, 400, (1, 8), generator=g), 6)
    return rec.to_frame(), model


def _figures(trace: pd.DataFrame, model) -> dict:
    sim = cachesim.simulate(trace, [4, 8, 16], policies=("lru", "belady"))
    lens = logit_lens(model, trace[trace["prompt"] == 0].drop_duplicates("token_index")["token"].to_numpy(),
                      target_token="next")
    return {"heatmap": plots.selection_heatmap(metrics.selection_counts(trace)),
            "unique": plots.unique_experts_per_layer(metrics.unique_experts(trace)),
            "entropy": plots.entropy_per_layer(metrics.load_entropy(trace)),
            "reuse": plots.reuse_per_layer(metrics.reuse(trace)),
            "cache": plots.cache_hit_rates(sim),
            "lens": plots.logit_lens_ranks(lens[lens["position"] == 5], position=5)}


@pytest.mark.parametrize("suffix", [".png", ".svg", ".pdf"])
def test_save_figure_is_byte_identical_across_saves_and_rebuilds(trace_and_model, tmp_path, suffix):
    trace, model = trace_and_model
    first, second = _figures(trace, model), _figures(trace, model)
    for name in first:
        a = plots.save_figure(first[name], tmp_path / f"a_{name}{suffix}")
        b = plots.save_figure(first[name], tmp_path / f"b_{name}{suffix}")
        c = plots.save_figure(second[name], tmp_path / "sub" / f"c_{name}{suffix}")
        assert a.stat().st_size > 1000
        assert a.read_bytes() == b.read_bytes() == c.read_bytes(), name
    if suffix == ".svg":
        assert b"<dc:date>" not in a.read_bytes()


def test_plotted_values_equal_the_metrics(trace_and_model):
    trace, _ = trace_and_model
    counts = metrics.selection_counts(trace)
    fig = plots.selection_heatmap(counts)
    mesh = fig.axes[0].collections[0]
    grid = counts.pivot(index="layer", columns="expert", values="count").to_numpy()
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(grid.shape), grid)
    # every token picks k=2 of 8 experts in each of 4 layers: 4 prompts x (8 + 6 - 1) tokens x 2 per layer
    assert grid.sum(axis=1).tolist() == [4 * 13 * 2] * 4

    r = metrics.reuse(trace)
    ax = plots.reuse_per_layer(r).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), r["reuse"].to_numpy())
    assert ax.lines[1].get_ydata()[0] == 2 / 8     # the chance line

    sim = cachesim.simulate(trace, [4, 8], policies=("lru", "belady"))
    ax = plots.cache_hit_rates(sim).axes[0]
    got = {line.get_label(): list(line.get_ydata()) for line in ax.lines}
    assert got == {p: sim[sim["policy"] == p]["hit_rate"].tolist() for p in ("lru", "belady")}


def test_plot_inputs_are_checked(trace_and_model):
    trace, _ = trace_and_model
    with pytest.raises(InputError, match="lacks columns"):
        plots.reuse_per_layer(metrics.load_entropy(trace))
    with pytest.raises(InputError, match="format"):
        plots.save_figure(plots.entropy_per_layer(metrics.load_entropy(trace)), "/tmp/x.gif")
