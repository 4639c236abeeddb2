"""The routing explorer of notebook 05: pick a prompt, a layer and a token, see where it was routed.

In JupyterLab (`interactive=True`) it is an ipywidgets panel; headless it falls back to one static figure,
so papermill and nbval runs stay deterministic.
"""
from __future__ import annotations

from matplotlib.figure import Figure
import numpy as np
import pandas as pd


def routing_matrix(frame: pd.DataFrame, prompt, layer: int, num_experts: int | None = None) -> np.ndarray:
    """[tokens, E] renormalised routing weights of one prompt in one layer (0 where not chosen)."""
    f = frame[(frame["prompt"] == prompt) & (frame["layer"] == layer)]
    E = num_experts or int(frame["expert"].max()) + 1
    tokens = np.sort(f["token_index"].unique())
    m = np.zeros((len(tokens), E))
    row = np.searchsorted(tokens, f["token_index"].to_numpy())
    m[row, f["expert"].to_numpy()] = f["weight"].to_numpy()
    return m


def routing_figure(frame: pd.DataFrame, prompt, layer: int, token: int | None = None, tokenizer=None,
                   num_experts: int | None = None):
    """Heatmap of one prompt's routing in one layer (tokens x experts), one token's row highlighted."""
    m = routing_matrix(frame, prompt, layer, num_experts)
    fig = Figure(figsize=(8, 0.9 + 0.22 * len(m)))
    ax = fig.add_subplot()
    ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=max(m.max(), 1e-9))
    f = frame[(frame["prompt"] == prompt) & (frame["layer"] == layer)].drop_duplicates("token_index")
    f = f.sort_values("token_index")
    labels = [repr(tokenizer.decode([int(t)]))[1:-1] if tokenizer else str(int(t)) for t in f["token"]]
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    if token is not None and 0 <= token < len(m):
        ax.axhline(token - 0.5, color="red", lw=1)
        ax.axhline(token + 0.5, color="red", lw=1)
        chosen = np.nonzero(m[token])[0]
        ax.set_title(f"prompt {prompt}, layer {layer}: token {token} -> experts {chosen.tolist()}", fontsize=9)
    else:
        ax.set_title(f"prompt {prompt}, layer {layer}", fontsize=9)
    ax.set_xlabel("expert")
    fig.tight_layout()
    return fig


def explorer(frame: pd.DataFrame, tokenizer=None, *, interactive: bool = False, num_experts: int | None = None):
    """An ipywidgets explorer (prompt, layer, token) when interactive, else the static figure it starts on."""
    prompts = list(dict.fromkeys(frame["prompt"]))
    layers = sorted(frame["layer"].unique())
    if not interactive:
        return routing_figure(frame, prompts[0], int(layers[0]), 0, tokenizer, num_experts)
    import ipywidgets as w
    from IPython.display import display

    prompt = w.Dropdown(options=prompts, value=prompts[0], description="prompt")
    layer = w.IntSlider(value=int(layers[0]), min=int(layers[0]), max=int(layers[-1]), description="layer")
    token = w.IntSlider(value=0, min=0, max=int(frame["token_index"].max()), description="token")

    def show(prompt, layer, token):
        display(routing_figure(frame, prompt, layer, token, tokenizer, num_experts))

    out = w.interactive_output(show, {"prompt": prompt, "layer": layer, "token": token})
    panel = w.VBox([w.HBox([prompt, layer, token]), out])
    display(panel)
    return panel
