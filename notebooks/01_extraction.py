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
# # 01 Extraction
#
# Is every thinker tensor in the checkpoint, where does it live, and can we take the thinker text model out whole and verified?

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
import torch
import q3lab
from q3lab.viz import notebooks as nbk, plots, plots_model
from IPython.display import display

src = nbk.open_checked(checkpoint)           # fails here, with the audit's report, on a bad folder
figures, out = nbk.setup(src, figures_dir, out_dir)

# %%
from q3lab.weights import inventory
from q3lab.viz import plots_model
from q3lab.weights.checkpoint import audit_checkpoint
report = audit_checkpoint(src)
print(report.summary())

# %% [markdown]
# The audit checks every tensor that `config.json` implies against the index and the shard headers; it is the first cell of every notebook, so a wrong folder stops here.

# %%
table = inventory.tensor_table(src)
components = inventory.bytes_by_component(table)
display(components)
fig = plots_model.component_bytes(components)
plots.save_figure(fig, figures / '01_component_bytes.png')
fig

# %% [markdown]
# The thinker's text model is the bulk of the checkpoint; the stub audio, vision, talker and code2wav parts are what extraction must leave behind.

# %%
layers = inventory.thinker_layers(table)
display(layers.head(8))
fig = plots_model.layer_shards(layers)
plots.save_figure(fig, figures / '01_layer_shards.png')
fig

# %% [markdown]
# Layers in red are split across shard files: a reader that opens one shard per layer would miss tensors. q3lab finds every tensor through `model.safetensors.index.json`.

# %%
store_dir = out / 'store'
store_path = q3lab.extract(src.path, store_dir, progress=False)
verified = q3lab.verify(store_path, progress=False)
print(verified)
store = q3lab.open_weights(store_path)
same = all(torch.equal(store.get(n), src.get(n)) for n in src.names() if '.experts.' not in n)
same &= all(torch.equal(a, b) for l in range(src.config.num_hidden_layers)
            for e in (0, src.config.num_experts - 1) for a, b in zip(store.expert(l, e), src.expert(l, e)))
print('store equals checkpoint, bit for bit:', same)

# %% [markdown]
# The extracted store holds only the thinker text model, every tensor checksummed; reading one expert from it is one contiguous read. `q3lab extract --verify` re-checks every checksum.
