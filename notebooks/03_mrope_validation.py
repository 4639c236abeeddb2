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
# # 03 mRoPE validation
#
# Does our rotary equal transformers', is text-only interleaved mRoPE really 1-D RoPE, and what do the wrong conventions do?

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
omni_inputs = ""                             # an image and a sound (folder); "": the repository's data/omni_inputs

# %%
# %matplotlib inline
import torch
import q3lab
from q3lab.viz import notebooks as nbk, plots, plots_model
from IPython.display import display

src = nbk.open_checked(checkpoint)           # fails here, with the audit's report, on a bad folder
figures, out = nbk.setup(src, figures_dir, out_dir)

# %%
from q3lab.analysis import rope_check
from q3lab.viz import plots_model
cfg = src.config
try:
    display(rope_check.compare_with_reference(cfg))
except ImportError:
    print('transformers is not installed (pip install q3lab[reference]): reference check skipped')

# %% [markdown]
# Against transformers' `Qwen3OmniMoeThinkerTextRotaryEmbedding`, cos and sin agree for text positions and for random 3-axis (temporal, height, width) positions.

# %%
pos = torch.arange(512)[None]
inv = q3lab.runtime.thinker.rope_inv_freq(cfg.head_dim, cfg.rope_theta)
one_d = pos[..., None].float() * inv
three = q3lab.runtime.thinker.mrope_freqs(pos[None].expand(3, 1, 512), inv, cfg.mrope_section, True)
print('text: interleaved mRoPE == 1-D RoPE, bit for bit:', torch.equal(three, one_d))
g = torch.Generator().manual_seed(0)
mm = torch.randint(0, 64, (3, 1, 512), generator=g)
inter = q3lab.runtime.thinker.mrope_freqs(mm, inv, cfg.mrope_section, True)
chunk = q3lab.runtime.thinker.mrope_freqs(mm, inv, cfg.mrope_section, False)
differ = (inter != chunk).any(dim=(0, 1))
print(f'multimodal: interleaved and chunked layouts differ at {int(differ.sum())} of {differ.numel()} frequencies')

# %%
maps = {'interleaved (Qwen3-Omni)': rope_check.axis_map(cfg.mrope_section, True),
        'chunked (Qwen2-VL)': rope_check.axis_map(cfg.mrope_section, False)}
fig = plots_model.axis_map(maps)
plots.save_figure(fig, figures / '03_axis_map.png')
fig

# %% [markdown]
# Interleaved mRoPE spreads temporal, height and width over the whole frequency range (THW repeated, then T); the chunked layout gives height and width only low frequencies. With equal positions on all axes (text) both reduce to 1-D RoPE, so text alone cannot tell them apart.

# %%
model, tok, items = nbk.load_model(src, prompts, max_prompts, dtype=dtype, expert_cache=expert_cache)

# %%
from q3lab.analysis.study import rotary_damage
rot = rotary_damage(model, tok, items)
display(rot.groupby('condition', sort=False)[['kl', 'rank']].median())
fig = plots_model.damage(rot, title='Wrong rotary conventions vs the right one (text prompts)')
plots.save_figure(fig, figures / '03_wrong_rotary.png')
fig

# %% [markdown]
# On text, the chunked layout changes nothing (KL 0), as the equal-axes proof says; a wrong base (Llama's 10,000 where the config says 1,000,000) or no rotary at all moves the distribution and the expected token's rank.

# %% [markdown]
# ## Positions of a real multimodal input
# One user turn of the released chat template holding an image and a sound (`omni_inputs`), laid out as the
# real processor lays it out: the real checkpoint's token ids and tower sizes (16-pixel patches merged 2x2, 13
# audio tokens per second of 100 mel frames). q3lab's 3-axis positions (`q3lab.omni.positions`) against
# transformers' own `get_rope_index`, axis by axis, and the rope delta that decoding continues from.

# %%
from q3lab.omni import modality as omni_modality, plots as omni_plots
media = omni_modality.read_media(omni_inputs or nbk.REPO / "data" / "omni_inputs")
positions, position_check = omni_modality.positions_check(media)
display(position_check)
fig = omni_plots.position_axes(positions)
plots.save_figure(fig, figures / '03_multimodal_positions.png')
fig

# %% [markdown]
# The image's tokens share one temporal position and walk its grid in height and width; the audio's tokens
# and the text after them advance on all three axes together, from the largest position the image reached.
