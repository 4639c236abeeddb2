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
# # 02 Norm recovery
#
# Are all RMSNorm weights found, and what happens when some silently fall back to their default initialisation (ones), as they did in the earlier attempt?

# %% tags=["parameters"]
checkpoint = "../data/mini"                 # a checkpoint folder or an extracted store
prompts = "../data/prompts/facts.jsonl"      # JSONL: prompt, expected (, domain)
figures_dir = "../figures"
out_dir = "../out/notebooks"
max_prompts = 24
dtype = "float32"                            # "bfloat16" for the real thinker on a small machine
expert_cache = 0                             # experts kept resident (0: all); e.g. 2048 for the real thinker
compare_reference = True                     # 04: also run transformers' thinker on the same weights
interactive = False                          # True in JupyterLab for the widgets

# %%
# %matplotlib inline
import q3lab
from q3lab.viz import notebooks as nbk, plots, plots_model
from IPython.display import display

src = nbk.open_checked(checkpoint)           # fails here, with the audit's report, on a bad folder
figures, out = nbk.setup(src, figures_dir, out_dir)

# %%
from q3lab.weights import inventory
from q3lab.viz import plots_model
norms = inventory.norm_table(src)
print(len(norms), 'norms found;', int(norms['all_ones'].sum()), 'are all ones')
display(norms.groupby('kind')[['mean', 'std', 'min', 'max']].mean())
fig = plots_model.norm_stats(norms)
plots.save_figure(fig, figures / '02_norm_stats.png')
fig

# %% [markdown]
# Every norm is found through the index, and none equals the all-ones default: a loader that fell back to ones would be visibly wrong here.

# %%
model, tok, items = nbk.load_model(src, prompts, max_prompts, dtype=dtype, expert_cache=expert_cache)

# %%
from q3lab.analysis.ablations import default_norm_layers
from q3lab.analysis.study import norm_damage
layers = default_norm_layers(model.config.num_hidden_layers)
print('layers reset to ones:', layers)
damage = norm_damage(model, tok, items, layers)
display(damage.groupby('condition', sort=False)[['kl', 'rank']].median())

# %%
fig = plots_model.damage(damage, title='Norms reset to ones vs the intact model')
plots.save_figure(fig, figures / '02_norm_damage.png')
fig

# %%
med = damage.groupby('condition', sort=False)[['kl', 'rank']].median()
worst = med['kl'].idxmax()
print(f"largest damage: {worst}: median KL {med.loc[worst, 'kl']:.3g} nats, median rank of the "
      f"expected token {med.loc[worst, 'rank']:g} (intact: {med.loc['intact', 'rank']:g})")

# %% [markdown]
# Resetting norms to ones moves the next-token distribution away from the intact model's (KL, nats) and can push the expected token down the ranking. How far depends on how far the trained norms are from one: the statistics above show it for this checkpoint. In the embedded mini model most norms stay within a few percent of one, so resetting every fourth layer costs little, while the QK-norms and the final norm, which drifted further, cost more. Whatever the size, the damage is silent, which is why q3lab refuses to load a checkpoint with a missing norm.
