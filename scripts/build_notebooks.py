"""Write the numbered notebooks from the cell lists below (then `make demo` executes them in place).

Notebooks are thin: a title and question, one `parameters` cell, calls into q3lab, figures saved with
q3lab.plots.save_figure, and a sentence per figure. Edit the cells here, rerun this script, rerun the demo.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"

PARAMS = '''checkpoint = "../data/mini"                 # a checkpoint folder or an extracted store
prompts = "../data/prompts/facts.jsonl"      # JSONL: prompt, expected (, domain)
figures_dir = "../figures"
out_dir = "../out/notebooks"
max_prompts = 24
dtype = "float32"                            # "bfloat16" for the real thinker on a small machine
expert_cache = 0                             # experts kept resident (0: all); e.g. 2048 for the real thinker
compare_reference = True                     # 04: also run transformers' thinker on the same weights
interactive = False                          # True in JupyterLab for the widgets'''

SETUP = '''%matplotlib inline
from pathlib import Path
import torch
import pandas as pd
import q3lab
from q3lab import notebooks as nbk, plots, plots_model
from IPython.display import display

torch.manual_seed(0)
pd.set_option("display.precision", 4)
figures, out = Path(figures_dir), Path(out_dir)
figures.mkdir(parents=True, exist_ok=True); out.mkdir(parents=True, exist_ok=True)
src = nbk.open_checked(checkpoint)           # fails here, with the audit's report, on a bad folder
print(type(src).__name__, src.path, "|", src.config.num_hidden_layers, "layers,",
      src.config.num_experts, "experts, top", src.config.num_experts_per_tok)'''

LOAD_MODEL = '''model = q3lab.load(src, dtype=getattr(torch, dtype),
                   experts=q3lab.ExpertCache(expert_cache) if expert_cache else None)
tok = q3lab.load_tokenizer(src.path)
items = nbk.read_prompts(prompts)[:max_prompts]
print(len(items), "prompts; e.g.", repr(items[0]["prompt"]))'''

NOTEBOOKS = {
    "01_extraction": [
        ("md", "# 01 Extraction\n\nIs every thinker tensor in the checkpoint, where does it live, and can we "
               "take the thinker text model out whole and verified?"),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", "from q3lab import inventory, plots_model\nfrom q3lab.checkpoint import audit_checkpoint\n"
                 "report = audit_checkpoint(src)\nprint(report.summary())"),
        ("md", "The audit checks every tensor that `config.json` implies against the index and the shard "
               "headers; it is the first cell of every notebook, so a wrong folder stops here."),
        ("code", "table = inventory.tensor_table(src)\ncomponents = inventory.bytes_by_component(table)\n"
                 "display(components)\nfig = plots_model.component_bytes(components)\n"
                 "plots.save_figure(fig, figures / '01_component_bytes.png')\nfig"),
        ("md", "The thinker's text model is the bulk of the checkpoint; the stub audio, vision, talker and "
               "code2wav parts are what extraction must leave behind."),
        ("code", "layers = inventory.thinker_layers(table)\ndisplay(layers.head(8))\n"
                 "fig = plots_model.layer_shards(layers)\nplots.save_figure(fig, figures / '01_layer_shards.png')\nfig"),
        ("md", "Layers in red are split across shard files: a reader that opens one shard per layer would "
               "miss tensors. q3lab finds every tensor through `model.safetensors.index.json`."),
        ("code", "store_dir = out / 'store'\nstore_path = q3lab.extract(src.path, store_dir, progress=False)\n"
                 "verified = q3lab.verify(store_path, progress=False)\nprint(verified)\n"
                 "store = q3lab.open_weights(store_path)\n"
                 "same = all(torch.equal(store.get(n), src.get(n)) for n in src.names() if '.experts.' not in n)\n"
                 "same &= all(torch.equal(a, b) for l in range(src.config.num_hidden_layers) "
                 "for e in (0, src.config.num_experts - 1) for a, b in zip(store.expert(l, e), src.expert(l, e)))\n"
                 "print('store equals checkpoint, bit for bit:', same)"),
        ("md", "The extracted store holds only the thinker text model, every tensor checksummed; reading one "
               "expert from it is one contiguous read. `q3lab extract --verify` re-checks every checksum."),
    ],
    "02_norm_recovery": [
        ("md", "# 02 Norm recovery\n\nAre all RMSNorm weights found, and what happens when some silently fall "
               "back to their default initialisation (ones), as they did in the earlier attempt?"),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", "from q3lab import inventory, plots_model\nnorms = inventory.norm_table(src)\n"
                 "print(len(norms), 'norms found;', int(norms['all_ones'].sum()), 'are all ones')\n"
                 "display(norms.groupby('kind')[['mean', 'std', 'min', 'max']].mean())\n"
                 "fig = plots_model.norm_stats(norms)\nplots.save_figure(fig, figures / '02_norm_stats.png')\nfig"),
        ("md", "Every norm is found through the index, and none equals the all-ones default: a loader that "
               "fell back to ones would be visibly wrong here."),
        ("code", LOAD_MODEL),
        ("code", "from q3lab.ablations import default_norm_layers\nfrom q3lab.study import norm_damage\n"
                 "layers = default_norm_layers(model.config.num_hidden_layers)\nprint('layers reset to ones:', layers)\n"
                 "damage = norm_damage(model, tok, items, layers)\n"
                 "display(damage.groupby('condition', sort=False)[['kl', 'rank']].median())"),
        ("code", "fig = plots_model.damage(damage, title='Norms reset to ones vs the intact model')\n"
                 "plots.save_figure(fig, figures / '02_norm_damage.png')\nfig"),
        ("code", "med = damage.groupby('condition', sort=False)[['kl', 'rank']].median()\n"
                 "worst = med['kl'].idxmax()\n"
                 "print(f\"largest damage: {worst}: median KL {med.loc[worst, 'kl']:.3g} nats, median rank of the \"\n"
                 "      f\"expected token {med.loc[worst, 'rank']:g} (intact: {med.loc['intact', 'rank']:g})\")"),
        ("md", "Resetting norms to ones moves the next-token distribution away from the intact model's (KL, "
               "nats) and can push the expected token down the ranking. How far depends on how far the trained "
               "norms are from one: the statistics above show it for this checkpoint. In the embedded mini model "
               "most norms stay within a few percent of one, so resetting every fourth layer costs little, while "
               "the QK-norms and the final norm, which drifted further, cost more. Whatever the size, the damage "
               "is silent, which is why q3lab refuses to load a checkpoint with a missing norm."),
    ],
    "03_mrope_validation": [
        ("md", "# 03 mRoPE validation\n\nDoes our rotary equal transformers', is text-only interleaved mRoPE "
               "really 1-D RoPE, and what do the wrong conventions do?"),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", "from q3lab import rope_check, plots_model\ncfg = src.config\ntry:\n"
                 "    display(rope_check.compare_with_reference(cfg))\nexcept ImportError:\n"
                 "    print('transformers is not installed (pip install q3lab[reference]): reference check skipped')"),
        ("md", "Against transformers' `Qwen3OmniMoeThinkerTextRotaryEmbedding`, cos and sin agree for text "
               "positions and for random 3-axis (temporal, height, width) positions."),
        ("code", "pos = torch.arange(512)[None]\ninv = q3lab.model.rope_inv_freq(cfg.head_dim, cfg.rope_theta)\n"
                 "one_d = pos[..., None].float() * inv\n"
                 "three = q3lab.model.mrope_freqs(pos[None].expand(3, 1, 512), inv, cfg.mrope_section, True)\n"
                 "print('text: interleaved mRoPE == 1-D RoPE, bit for bit:', torch.equal(three, one_d))\n"
                 "g = torch.Generator().manual_seed(0)\nmm = torch.randint(0, 64, (3, 1, 512), generator=g)\n"
                 "inter = q3lab.model.mrope_freqs(mm, inv, cfg.mrope_section, True)\n"
                 "chunk = q3lab.model.mrope_freqs(mm, inv, cfg.mrope_section, False)\n"
                 "differ = (inter != chunk).any(dim=(0, 1))\n"
                 "print(f'multimodal: interleaved and chunked layouts differ at {int(differ.sum())} of {differ.numel()} frequencies')"),
        ("code", "maps = {'interleaved (Qwen3-Omni)': rope_check.axis_map(cfg.mrope_section, True),\n"
                 "        'chunked (Qwen2-VL)': rope_check.axis_map(cfg.mrope_section, False)}\n"
                 "fig = plots_model.axis_map(maps)\nplots.save_figure(fig, figures / '03_axis_map.png')\nfig"),
        ("md", "Interleaved mRoPE spreads temporal, height and width over the whole frequency range (THW "
               "repeated, then T); the chunked layout gives height and width only low frequencies. With equal "
               "positions on all axes (text) both reduce to 1-D RoPE, so text alone cannot tell them apart."),
        ("code", LOAD_MODEL),
        ("code", "from q3lab.study import rotary_damage\nrot = rotary_damage(model, tok, items)\n"
                 "display(rot.groupby('condition', sort=False)[['kl', 'rank']].median())\n"
                 "fig = plots_model.damage(rot, title='Wrong rotary conventions vs the right one (text prompts)')\n"
                 "plots.save_figure(fig, figures / '03_wrong_rotary.png')\nfig"),
        ("md", "On text, the chunked layout changes nothing (KL 0), as the equal-axes proof says; a wrong base "
               "(Llama's 10,000 where the config says 1,000,000) or no rotary at all moves the distribution and the expected token's rank."),
    ],
    "04_logit_ranking": [
        ("md", "# 04 Logit ranking\n\nDoes the model rank the expected continuation first, does it agree with "
               "the reference, where in depth does the answer appear, and what does each known bug do?"),
        ("params", PARAMS),
        ("code", SETUP),
        ("code", LOAD_MODEL),
        ("code", "from q3lab.ranking import rank_prompts, top_tokens\nranks = rank_prompts(model, tok, items)\n"
                 "display(ranks)\nprint(f\"top-1: {(ranks['rank'] == 1).mean():.0%} of {len(ranks)} prompts\")"),
        ("code", "ids = torch.tensor([tok.encode(items[0]['prompt'])])\nprint(repr(items[0]['prompt']))\n"
                 "display(top_tokens(model(ids)[0, -1], tok, k=10))"),
        ("md", "The top-10 table shows the whole head of the distribution for the first prompt, not only the "
               "winner."),
        ("code", "from q3lab.study import reference_agreement\nif not compare_reference:\n"
                 "    print('reference comparison skipped (compare_reference = False)')\nelse:\n"
                 "    try:\n        display(reference_agreement(src, model, tok, items[:8]))\n"
                 "    except ImportError:\n"
                 "        print('transformers is not installed: reference comparison skipped')"),
        ("md", "transformers' own Qwen3-Omni thinker, filled with the same tensors, gives the same logits (max "
               "absolute difference in float32) and the same top token."),
        ("code", "from q3lab.study import lens_ranks\nlens = lens_ranks(model, tok, items[:8])\n"
                 "fig = plots.logit_lens_ranks(lens)\nplots.save_figure(fig, figures / '04_logit_lens.png')\nfig"),
        ("md", "The logit lens (final norm and lm_head applied after every layer) shows at which depth the "
               "expected token rises to the top; the last layer's lens is the model's own output."),
        ("code", "from q3lab.study import ablation_damage\nabl = ablation_damage(model, tok, items)\n"
                 "display(abl.groupby('condition', sort=False)[['kl', 'rank']].median())\n"
                 "fig = plots_model.damage(abl, title='Known reconstruction bugs vs the intact model')\n"
                 "plots.save_figure(fig, figures / '04_ablations.png')\nfig"),
        ("md", "Each bug the earlier attempt made, reproduced on purpose: per-sequence routing, an expert "
               "output cut to a scalar, a router masked to the first experts, missing norms, and a second "
               "softmax in place of `norm_topk_prob`. The routing bugs (per-sequence routing, a masked router, "
               "scalar expert outputs) push the expected token far down the ranking; missing norms and a "
               "second softmax are subtler: the distribution moves (KL) while the top token often survives, "
               "so a spot check of the top token alone would miss them."),
    ],
    "05_expert_diversity": [
        ("md", "# 05 Expert diversity\n\nHow does the thinker route, layer by layer: how many experts does it "
               "use, how evenly, how much does it reuse them from one token to the next, do expert ids mean "
               "anything across layers, do domains have their own experts, and what does that mean for an "
               "expert cache?"),
        ("params", PARAMS.replace('"../data/prompts/facts.jsonl"      # JSONL: prompt, expected (, domain)',
                                  '"../data/prompts/domains.jsonl"    # JSONL: prompt, domain')
                   + "\nmax_new_tokens = 8                           # greedy tokens generated after each prompt"
                   + "\ncapacity_fractions = [0.02, 0.05, 0.1, 0.2, 0.32, 0.5, 0.75]"),
        ("code", SETUP),
        ("code", LOAD_MODEL.replace("nbk.read_prompts(prompts)[:max_prompts]",
                                    "nbk.balanced(nbk.read_prompts(prompts), max_prompts, 'domain')")),
        ("code", "from q3lab import metrics, cachesim, explorer, plots_model\nfrom q3lab.study import trace_prompts\n"
                 "from q3lab.record import save_trace\nE = model.config.num_experts\n"
                 "trace = trace_prompts(model, tok, items, max_new_tokens)\nsave_trace(trace, out / '05_trace.parquet')\n"
                 "print(f\"{trace['prompt'].nunique()} prompts, {len(trace.drop_duplicates(['prompt', 'token_index']))} "
                 "tokens, {len(trace)} routing rows; domains: {sorted(trace['domain'].dropna().unique())}\")\n"
                 "display(metrics.layer_summary(trace, E).describe().loc[['mean', 'min', 'max']])"),
        ("code", "fig = plots.selection_heatmap(metrics.selection_counts(trace, E), share=True)\n"
                 "plots.save_figure(fig, figures / '05_selection_heatmap.png')\nfig"),
        ("md", "Each row is a layer, each column an expert; colour is the share of that layer's selections. "
               "Load is spread over many experts in every layer, with a few favourites per layer."),
        ("code", "fig = plots.unique_experts_per_layer(metrics.unique_experts(trace, E))\n"
                 "plots.save_figure(fig, figures / '05_unique_experts.png')\nfig"),
        ("code", "fig = plots.entropy_per_layer(metrics.load_entropy(trace, E))\n"
                 "plots.save_figure(fig, figures / '05_entropy.png')\nfig"),
        ("md", "Unique experts and the normalised entropy of the load (1 = perfectly even) per layer: no layer "
               "leaves most experts idle, so a static hot set of a few experts cannot serve the model."),
        ("code", "reuse = metrics.reuse(trace, E)\nfig = plots.reuse_per_layer(reuse)\n"
                 "plots.save_figure(fig, figures / '05_reuse.png')\nfig"),
        ("md", "Consecutive tokens share more experts than chance (dashed line, k/E): reuse over time is what "
               "an expert cache can exploit."),
        ("code", "cross = metrics.cross_layer_association(trace, E)\n"
                 "print(f\"layer pairs where the same id is reused beyond shuffles (p < 0.05): "
                 "{int((cross['p_value'] < 0.05).sum())} of {len(cross)}; median lift over shuffles "
                 "{cross['lift'].median():.2f}\")\n"
                 "fig = plots_model.layer_lines(cross, {'observed': 'P(e in layer l+1 | e in layer l)', "
                 "'shuffle_mean': 'shuffled tokens', 'chance': 'chance k/E'}, dashed=('shuffle_mean', 'chance'), "
                 "title='Does expert id e mean the same in the next layer?', ylabel='probability')\n"
                 "plots.save_figure(fig, figures / '05_cross_layer.png')\nfig"),
        ("md", "Where the observed line sits on the shuffled baseline, expert e in one layer says nothing "
               "about expert e in the next; where it rises above, the ids of those two layers are correlated "
               "(the printout counts such pairs and the typical lift). \"Expert 23 means poetry in every "
               "layer\" has to be tested per layer pair, not assumed."),
        ("code", "dom = metrics.domain_specificity(trace, 'domain', E)\n"
                 "fig = plots_model.layer_lines(dom, {'mi_bits': 'I(domain; expert)', 'shuffle_mean': "
                 "'shuffled domain labels', 'h_label_bits': 'H(domain), the upper bound'}, "
                 "dashed=('shuffle_mean', 'h_label_bits'), title='Domain specificity of routing', ylabel='bits')\n"
                 "plots.save_figure(fig, figures / '05_domain_specificity.png')\nfig"),
        ("md", "Mutual information between a prompt's domain and the experts its tokens choose, per layer, "
               "against the same statistic with shuffled labels (the finite-sample bias): the gap is how "
               "much routing specialises by domain."),
        ("code", "total = model.config.num_hidden_layers * E\n"
                 "caps = sorted({max(model.config.num_experts_per_tok, int(f * total)) for f in capacity_fractions})\n"
                 "sim = cachesim.simulate(trace, caps)\n"
                 "display(sim.pivot(index='capacity', columns='policy', values='hit_rate'))\n"
                 "fig = plots.cache_hit_rates(sim)\nplots.save_figure(fig, figures / '05_cache_hit_rate.png')\nfig"),
        ("md", "Replaying the trace through an expert cache shared by all layers: hit rate against capacity "
               "for LRU, LFU, the router-weight score policy and Belady's offline optimum, the bound no "
               "policy can beat on this trace."),
        ("code", "view = explorer.explorer(trace, tok, interactive=interactive, num_experts=E)\n"
                 "if not interactive:\n    plots.save_figure(view, figures / '05_explorer_static.png')\n    display(view)"),
        ("md", "The explorer: pick a prompt, a layer and a token to see the routing weights of every token of "
               "that prompt in that layer (the chosen token outlined). Headless runs show its first view."),
    ],
}


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, text in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(text))
        else:
            cell = nbformat.v4.new_code_cell(text)
            if kind == "params":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name[:2]}-{i:02d}"
    return nb


def main(names: list[str]) -> None:
    NB_DIR.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        if names and not any(name.startswith(n) for n in names):
            continue
        nbformat.write(build(name, cells), NB_DIR / f"{name}.ipynb")
        print("wrote", NB_DIR / f"{name}.ipynb")


if __name__ == "__main__":
    main(sys.argv[1:])
