# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 Routing atlas
#
# How does the thinker route over a corpus, not a few prompts: per-layer load and entropy, co-activation,
# domain, vocabulary and token-id specialisation, reuse from token to token, what an expert cache gets out of
# it, and how well experts can be predicted before the router runs; each against uniform routing (every token
# picking A of E experts at random). The trace is a `q3lab.atlas` Parquet dataset, analysed out of core with
# DuckDB: the same calls work on millions of tokens of the real thinker.

# %% tags=["parameters"]
checkpoint = "../data/mini"             # a checkpoint folder or an extracted store
corpus = "../data/heldout.jsonl"        # text, folder, JSONL ('text', 'domain') or Parquet ('text')
max_tokens = 60000                      # tokens traced (CI budget on 2 CPU cores: about 25 s)
window = 512
batch_size = 8
out_dir = "../out/notebooks"
dataset_dir = ""                        # the traced dataset (rewritten on each run); empty: OUT_DIR/atlas_heldout
figures_dir = "../figures"
model_name = ""                         # set for a second model's run: figures get _NAME, titles say it
cache_tokens = 512                      # tokens replayed through the cache simulator
predict_tokens = 6000                   # tokens run again for the expert predictors
dtype = "float32"
interactive = False

# %%
# %matplotlib inline
import shutil
from pathlib import Path

import pandas as pd
import torch
from IPython.display import display

import q3lab
from q3lab.viz import notebooks as nbk
from q3lab.atlas import open_dataset, plots as aplots, queries as Q
from q3lab.atlas.predict import expert_prediction
from q3lab.atlas.tracing import trace_corpus

pd.set_option("display.precision", 3)
figures = Path(figures_dir)
figures.mkdir(parents=True, exist_ok=True)
save = nbk.FigureSaver(figures, model_name)
dataset_dir = dataset_dir or str(Path(out_dir) / "atlas_heldout")
src = nbk.open_checked(checkpoint)
model = q3lab.load(src, dtype=getattr(torch, dtype))
tok = q3lab.load_tokenizer(src.path)
cfg = model.config
print(f"{cfg.num_hidden_layers} layers, top-{cfg.num_experts_per_tok} of {cfg.num_experts} experts")

# %% [markdown]
# ## Trace
# Teacher-forced windows of `window` tokens (documents longer than that in windows overlapping by half),
# `batch_size` windows per forward, written as Parquet parts (what `q3lab trace CKPT --corpus PATH --out DIR`
# does).

# %%
shutil.rmtree(dataset_dir, ignore_errors=True)
summary = trace_corpus(model, tok, corpus, dataset_dir, batch_size=batch_size, window=window,
                       max_tokens=max_tokens, progress=False)
ds = open_dataset(dataset_dir, require_complete=True)
print(f"{ds.num_tokens:,} tokens in {len(ds.parts)} parts, {ds.bytes_per_token():.0f} bytes/token on disk")
display(Q.sql(ds, "SELECT domain, count(*) AS tokens, count(DISTINCT doc_id) AS documents FROM {src} "
                  "GROUP BY domain ORDER BY domain"))

# %%
res = Q.atlas(ds, capacities=[4, 6, 8, 12, 16, 20, 24, 32], cache_tokens=cache_tokens, top_tokens=2048,
              min_count=10)
A, E = ds.top_k, ds.num_experts

# %% [markdown]
# ## Per-layer load

# %%
fig = aplots.layer_load(res["layers"])
save(fig, "06_layer_load.png")
L = res["layers"]
print(f"entropy {L['normalised_entropy'].min():.3f}-{L['normalised_entropy'].max():.3f} of uniform; experts for 90%: "
      f"{L['experts_for_mass'].min()}-{L['experts_for_mass'].max()} (uniform {L['uniform_experts_for_mass'].iloc[0]})")
fig

# %% [markdown]
# Reading: routing is close to uniform in entropy in every layer, yet 90% of the routing needs fewer experts
# than uniform routing would: a few experts per layer carry more than their share.

# %%
fig = aplots.load_heatmap(res["load"])
save(fig, "06_load_heatmap.png")
fig

# %% [markdown]
# Reading: the hot and cold experts differ from layer to layer: expert ids mean nothing across layers, so a
# static hot set has to be chosen per layer.

# %% [markdown]
# ## Co-activation P(b | a)

# %%
co = res["coactivation"]
mid = cfg.num_hidden_layers // 2
fig = aplots.coactivation(co, mid)
save(fig, "06_coactivation.png")
top = co.groupby("layer")["lift"].max()
print(f"largest lift of P(b|a) over uniform ({co['uniform'].iloc[0]:.3f}) per layer: median {top.median():.1f}x")
fig

# %% [markdown]
# Reading: some pairs of experts are chosen together several times more often than chance, others almost never:
# experts come in teams, which a prefetcher can exploit.

# %% [markdown]
# ## Domain specialisation

# %%
fig = aplots.domain_specialisation(res["domains"])
save(fig, "06_domains.png")
display(res["domains"].groupby("domain")["lift"].max().rename("largest lift").to_frame())
fig

# %% [markdown]
# Reading: every domain of the sample has experts it uses two to six times more often than the corpus does
# (facts the most), so routing tells the domains apart.

# %% [markdown]
# ## Vocabulary and token-id specialisation (input and predicted tokens)

# %%
fig = aplots.vocab_specialisation(res["vocab"])
save(fig, "06_vocab.png")
v = res["vocab"][res["vocab"]["rank"] == 1]
display(v.groupby("by")["specialisation"].median().rename("median top-token specialisation").to_frame())
fig

# %% [markdown]
# Reading: an expert's most frequent input token goes to it in most of its occurrences (about half for the
# predicted, next token), far above the uniform A/E: experts are more about what a token is than what follows.

# %%
fig = aplots.token_specialisation(res["tokens"])
save(fig, "06_token_ids.png")
display(res["tokens"].groupby("by")[["top_share", "uniform_top_share"]].mean())
fig

# %% [markdown]
# Reading: a token id sends most of its occurrences to one favourite expert in each layer, several times the
# uniform expectation with the same counts: routing is largely a function of the token id.

# %% [markdown]
# ## Reuse from token to token

# %%
fig = aplots.consecutive_overlap(res["overlap_summary"])
save(fig, "06_overlap.png")
s = res["overlap_summary"]
print(f"any overlap {s['any_overlap'].mean():.3f} (uniform {s['uniform_any_overlap'].iloc[0]:.3f}); "
      f"mean overlap {s['mean_overlap'].mean():.3f} (uniform {s['uniform_mean_overlap'].iloc[0]:.3f})")
fig

# %% [markdown]
# Reading: consecutive tokens share experts more often than uniform routing would make them, in every layer.

# %%
fig = aplots.reuse_distance(res["reuse"], [0, mid, cfg.num_hidden_layers - 1])
save(fig, "06_reuse.png")
r1 = res["reuse"][res["reuse"]["distance"] == 1]
print(f"share of reuses at distance 1: {r1['share'].mean():.3f} (uniform {r1['uniform_share'].iloc[0]:.3f})")
fig

# %% [markdown]
# Reading: short reuse distances are more frequent than the geometric uniform baseline and long ones rarer:
# an expert used recently is likely to be used again soon, which is what LRU-like caches bet on.

# %% [markdown]
# ## Expert caches: policies, Belady's bound, adaptive capacities

# %%
fig = aplots.cache_curves(res["cache"])
save(fig, "06_cache.png")
display(res["cache"].groupby(["policy", "capacity"])["hit_rate"].mean().unstack("capacity"))
fig

# %% [markdown]
# Reading: every policy beats the uniform c/E line, Belady bounds them all, and the gap between LRU and
# Belady is what a better policy or a predictor could still win.

# %%
ad = res["adaptive"]
fig = aplots.adaptive_capacities(ad)
save(fig, "06_adaptive.png")
w = ad["accesses"]
print(f"budget {ad.attrs['budget']} experts: hit rate {(ad['hit_rate'] * w).sum() / w.sum():.3f} adaptive, "
      f"{(ad['uniform_hit_rate'] * w).sum() / w.sum():.3f} even split")
fig

# %% [markdown]
# Reading: capacity moved to the layers whose hit rate still grows (read off the trace's own curves) does at
# least as well as an even split of the same budget, by construction; the line above gives the gain here.

# %% [markdown]
# ## Expert prediction
# Needs the hidden states, so it runs the model again on the first `predict_tokens` tokens: half of the
# documents fit the linear predictor, the other half are scored (`q3lab.atlas.predict`).

# %%
pred = expert_prediction(model, tok, corpus, max_tokens=predict_tokens, window=window)
fig = aplots.expert_prediction(pred)
save(fig, "06_prediction.png")
display(pred.groupby("predictor", sort=False)["accuracy"].mean().to_frame())
fig

# %% [markdown]
# Reading: the next layer's router on this layer's residual stream and the fitted pre-attention predictor
# both find most of a layer's experts before its router runs, far above chance and above "the previous
# token's experts".

# %% [markdown]
# ## Router saturation during training
# Models trained in this repository with probe routing recorded during training (`data/mini128/probes`):
# the share of each layer's top-k experts at a training checkpoint that the final model still picks for
# the same probe tokens (OLMoE's saturation curve).

# %%
from q3lab.analysis.saturation import load_probes, plot_saturation, router_saturation
probes_dir = Path(src.path) / "probes"
if probes_dir.is_dir():
    sat = router_saturation(load_probes(probes_dir))
    fig = save(plot_saturation(sat), "06_saturation.png")
    display(sat.groupby(["k", "step"])["saturation"].mean().unstack("k").round(3))
else:
    fig = None
    print(f"{src.path} ships no router probes (data/mini128 does): no saturation curve for this model")
fig

# %% [markdown]
# Reading (on `data/mini128`): agreement with the final routing rises through the whole run (top-8 about 0.6 of
# the final choices at 40% of the steps, 0.86 at 80%), top-1 lags top-8, and the first layers settle before the
# last ones: the router is not frozen early in this small model.
