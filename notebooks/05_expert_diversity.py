# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 Expert diversity
#
# How does the thinker route, layer by layer: how many experts does it use, how evenly, how much does it reuse them from one token to the next, do expert ids mean anything across layers, do domains have their own experts, and what does that mean for an expert cache?

# %% tags=["parameters"]
checkpoint = "../data/mini"                 # a checkpoint folder or an extracted store
prompts = "../data/prompts/domains.jsonl"    # JSONL: prompt, domain
figures_dir = "../figures"
out_dir = "../out/notebooks"
max_prompts = 24
dtype = "float32"                            # "bfloat16" for the real thinker on a small machine
expert_cache = 0                             # experts kept resident (0: all); e.g. 2048 for the real thinker
compare_reference = True                     # 04: also run transformers' thinker on the same weights
interactive = False                          # True in JupyterLab for the widgets
max_new_tokens = 8                           # greedy tokens generated after each prompt
capacity_fractions = [0.02, 0.05, 0.1, 0.2, 0.32, 0.5, 0.75]
model_name = ""                              # set for a second model's run: figures get _NAME, titles say it

# %%
# %matplotlib inline
import q3lab
from q3lab.viz import notebooks as nbk, plots, plots_model
from IPython.display import display

src = nbk.open_checked(checkpoint)           # fails here, with the audit's report, on a bad folder
figures, out = nbk.setup(src, figures_dir, out_dir)
save = nbk.FigureSaver(figures, model_name)

# %%
model, tok, items = nbk.load_model(src, prompts, max_prompts, dtype=dtype, expert_cache=expert_cache, balance='domain')

# %%
from q3lab.analysis import metrics, cachesim
from q3lab.viz import interactive as explorer, plots_model
from q3lab.analysis.study import trace_prompts
from q3lab.runtime.recording import save_trace
E = model.config.num_experts
trace = trace_prompts(model, tok, items, max_new_tokens)
save_trace(trace, out / '05_trace.parquet')
tokens = len(trace.drop_duplicates(['prompt', 'token_index']))
print(f"{trace['prompt'].nunique()} prompts, {tokens} tokens, {len(trace)} routing rows; "
      f"domains: {sorted(trace['domain'].dropna().unique())}")
display(metrics.layer_summary(trace, E).describe().loc[['mean', 'min', 'max']])

# %%
fig = plots.selection_heatmap(metrics.selection_counts(trace, E), share=True)
save(fig, '05_selection_heatmap.png')

# %% [markdown]
# Each row is a layer, each column an expert; colour is the share of that layer's selections. Load is spread over many experts in every layer, with a few favourites per layer.

# %%
fig = plots.unique_experts_per_layer(metrics.unique_experts(trace, E))
save(fig, '05_unique_experts.png')

# %%
fig = plots.entropy_per_layer(metrics.load_entropy(trace, E))
save(fig, '05_entropy.png')

# %% [markdown]
# Unique experts and the normalised entropy of the load (1 = perfectly even) per layer: no layer leaves most experts idle, so a static hot set of a few experts cannot serve the model.

# %%
reuse = metrics.reuse(trace, E)
fig = plots.reuse_per_layer(reuse)
save(fig, '05_reuse.png')

# %% [markdown]
# Consecutive tokens share more experts than chance (dashed line, k/E): reuse over time is what an expert cache can exploit.

# %%
cross = metrics.cross_layer_association(trace, E)
print(f"layer pairs where the same id is reused beyond shuffles (p < 0.05): {int((cross['p_value'] < 0.05).sum())} "
      f"of {len(cross)}; median lift over shuffles {cross['lift'].median():.2f}")
fig = plots_model.layer_lines(cross, {'observed': 'P(e in layer l+1 | e in layer l)', 'shuffle_mean': 'shuffled tokens',
                                      'chance': 'chance k/E'}, dashed=('shuffle_mean', 'chance'),
                              title='Does expert id e mean the same in the next layer?', ylabel='probability')
save(fig, '05_cross_layer.png')

# %% [markdown]
# Where the observed line sits on the shuffled baseline, expert e in one layer says nothing about expert e in the next; where it rises above, the ids of those two layers are correlated (the printout counts such pairs and the typical lift). "Expert 23 means poetry in every layer" has to be tested per layer pair, not assumed.

# %%
dom = metrics.domain_specificity(trace, 'domain', E)
fig = plots_model.layer_lines(dom, {'mi_bits': 'I(domain; expert)', 'shuffle_mean': 'shuffled domain labels',
                                    'h_label_bits': 'H(domain), the upper bound'},
                              dashed=('shuffle_mean', 'h_label_bits'), title='Domain specificity of routing', ylabel='bits')
save(fig, '05_domain_specificity.png')

# %% [markdown]
# Mutual information between a prompt's domain and the experts its tokens choose, per layer, against the same statistic with shuffled labels (the finite-sample bias): the gap is how much routing specialises by domain.

# %%
total = model.config.num_hidden_layers * E
caps = sorted({max(model.config.num_experts_per_tok, int(f * total)) for f in capacity_fractions})
sim = cachesim.simulate(trace, caps)
display(sim.pivot(index='capacity', columns='policy', values='hit_rate'))
fig = plots.cache_hit_rates(sim)
save(fig, '05_cache_hit_rate.png')

# %% [markdown]
# Replaying the trace through an expert cache shared by all layers: hit rate against capacity for LRU, LFU, the router-weight score policy and Belady's offline optimum, the bound no policy can beat on this trace.

# %%
view = explorer.explorer(trace, tok, interactive=interactive, num_experts=E)
if not interactive:
    display(save(view, '05_explorer_static.png'))

# %% [markdown]
# The explorer: pick a prompt, a layer and a token to see the routing weights of every token of that prompt in that layer (the chosen token outlined). Headless runs show its first view.
