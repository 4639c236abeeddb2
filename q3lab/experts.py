"""Expert providers: where the model's expert weights come from.

The model asks a provider for one layer's experts at a time. `ResidentExperts` keeps every expert in
memory (the reference behaviour); `ExpertCache` (below) loads experts on demand under a memory bound.

Provider protocol (duck-typed):
    bind(source, config, device, dtype)      once, from `q3lab.load`
    prepare(layer, experts: list[int])       before a layer computes; `experts` is sorted and unique
    weights(layer, e) -> (gate [I,D], up [I,D], down [D,I])   on the model's device and dtype
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import ThinkerConfig


class ExpertProvider:
    """Base class: subclasses load expert weights from a bound weight source."""

    config: ThinkerConfig
    device: torch.device
    dtype: torch.dtype

    def bind(self, source, config: ThinkerConfig, device, dtype: torch.dtype) -> None:
        self.source, self.config, self.device, self.dtype = source, config, torch.device(device), dtype

    def prepare(self, layer: int, experts: list[int]) -> None:
        pass

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _load(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Read one expert from the source and convert it to the model's device and dtype."""
        return tuple(t.to(device=self.device, dtype=self.dtype) for t in self.source.expert(layer, e))  # type: ignore


class ResidentExperts(ExpertProvider):
    """Every expert in memory, stacked per layer as [E, I, D] / [E, D, I]."""

    def bind(self, source, config, device, dtype, progress: bool = False) -> None:
        super().bind(source, config, device, dtype)
        L, E, I, D = config.num_hidden_layers, config.num_experts, config.moe_intermediate_size, config.hidden_size
        self.gate = torch.empty(L, E, I, D, device=device, dtype=dtype)
        self.up = torch.empty(L, E, I, D, device=device, dtype=dtype)
        self.down = torch.empty(L, E, D, I, device=device, dtype=dtype)
        bar = tqdm(total=L * E, desc="experts", unit="expert", disable=not progress)
        for layer in range(L):
            for e in range(E):
                g, u, d = source.expert(layer, e)
                self.gate[layer, e].copy_(g)
                self.up[layer, e].copy_(u)
                self.down[layer, e].copy_(d)
                bar.update()
        bar.close()

    def weights(self, layer: int, e: int):
        return self.gate[layer, e], self.up[layer, e], self.down[layer, e]
