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
# # 08 Multimodal routing
#
# How does the thinker route audio and image tokens, against text? The same prompt is run once as text and
# once around each input file (a sound, an image), the towers writing their embeddings over the placeholder
# tokens; `q3lab.record` labels every token with its modality, and the routing metrics are split by it:
# per-layer load and entropy, experts one modality uses and the others rarely do, cross-modal overlap, and
# what an expert cache hits when audio or image tokens arrive. Headless it runs on the tiny random full
# Qwen3-Omni that the tests build: its routing says nothing about the real thinker, and every figure says so.

# %% tags=["parameters"]
checkpoint = ""                          # a Qwen3-Omni checkpoint or store WITH towers; "": the tiny random model
inputs_dir = "../data/omni_inputs"       # wav/flac/ogg files and png/jpg images
prompt = "Describe what you hear and see."
max_new_tokens = 0                       # greedy tokens generated after each prompt (0: the prompt only)
expert_cache = 0                         # experts kept resident (0: all); e.g. 2048 for the real thinker
dtype = "float32"                        # "bfloat16" for the real thinker on a small machine
cache_capacity = 0                       # simulated cache (experts over all layers); 0: a quarter of L*E
arrival_tokens = 4                       # tokens of a modality's run counted as its arrival
out_dir = "../out/notebooks"
figures_dir = "../figures"
interactive = False

# %%
# %matplotlib inline
from pathlib import Path

import torch
from IPython.display import display

import q3lab
from q3lab.analysis import metrics
from q3lab.viz import notebooks as nbk
from q3lab.omni import modality as mod, plots as oplots
from q3lab.omni.inputs import OmniSpec

random_weights = not checkpoint
if random_weights:                       # the tiny random full model of the tests, rebuilt (a second or so)
    from transformers.utils import logging as hf_logging
    from q3lab.omni.synthetic import tiny_omni_checkpoint
    hf_logging.disable_progress_bar()    # its shard-writing bar would land in the outputs
    checkpoint = str(tiny_omni_checkpoint(Path(out_dir) / "08_tiny_omni", seed=0))
note = "random weights: a tiny untrained model, not the real thinker" if random_weights else ""
src = nbk.open_checked(checkpoint)
figures, out = nbk.setup(src, figures_dir, out_dir)
model = q3lab.load(src, towers=True, dtype=getattr(torch, dtype),
                   experts=q3lab.ExpertCache(expert_cache) if expert_cache else None)
spec = OmniSpec.from_config(src.raw_config)

# %% [markdown]
# ## The inputs
# Each file becomes one prompt: the chat turn's opening, the medium (its placeholder run), the question. With
# no tokenizer (the tiny model) the text is a fixed run of token ids.

# %%
media = mod.read_media(inputs_dir)
if src.tokenizer_dir is not None:
    tok = q3lab.load_tokenizer(src.tokenizer_dir)
    toks = mod.tokens_of(model)
    before = [toks.im_start_token_id, *tok.encode("user\n")]
    after = [*tok.encode(prompt), toks.im_end_token_id, *tok.encode("\n"), toks.im_start_token_id,
             *tok.encode("assistant\n")]
else:
    before, after = list(range(10, 14)), list(range(20, 32))
rec = mod.record_media(model, spec, media, before, after, max_new_tokens=max_new_tokens)
trace = rec.to_frame()
tokens = trace.drop_duplicates(["prompt", "token_index"])
display(tokens.groupby(["prompt", "modality"], observed=True).size().unstack(fill_value=0))

# %% [markdown]
# ## Load and entropy per modality

# %%
load = metrics.modality_load(trace)
entropy = metrics.modality_entropy(load)
display(entropy.groupby("modality")[["normalised_entropy", "distinct_experts"]].mean())
save = nbk.FigureSaver(figures)
save(oplots.modality_entropy(entropy, note=note), "08_modality_entropy.png")

# %% [markdown]
# Entropy of each modality's expert load per layer (1 = every expert equally often); a modality routed to
# fewer experts sits lower.

# %%
save(oplots.modality_load(load, note=note), "08_modality_load.png")

# %% [markdown]
# The share of each modality's tokens sent to each expert, in the first, middle and last layer.

# %% [markdown]
# ## Experts of one modality, and overlap between modalities

# %%
experts = metrics.modality_experts(load)
display(experts.groupby("modality").size().rename("exclusive experts").to_frame())
display(experts.head(8))
overlap = metrics.modality_overlap(load)
save(oplots.modality_overlap(overlap, note=note), "08_modality_overlap.png")

# %% [markdown]
# Overlap of two modalities' expert distributions per layer: near 1 they use the same experts in the same
# proportions, near 0 disjoint ones.

# %% [markdown]
# ## The expert cache when audio or image tokens arrive

# %%
L, E = model.config.num_hidden_layers, model.config.num_experts
capacity = cache_capacity or L * E // 4
hits = metrics.modality_hit_rate(trace, capacity, "lru", arrival_tokens=arrival_tokens)
display(hits)
save(oplots.modality_hit_rate(hits, note=note), "08_modality_hit_rate.png")

# %% [markdown]
# Hit rate of an LRU cache replaying the recorded order, by the modality of the token that asks: the first
# tokens of an audio or image run ask for experts the text before them did not use.
