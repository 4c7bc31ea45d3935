"""Turn the last-position logits of a batch into next tokens, each row with its own settings."""

from __future__ import annotations

import torch

from radixkv.engine.sampling_params import SamplingParams


class Sampler:
    """Greedy, temperature, top-k, top-p and min-p sampling with optional per-request generators.

    Rows with a seed draw from their own `torch.Generator`, so a seeded request gives the same
    tokens whatever it is batched with; the others share one engine generator.
    """

    def __init__(self, seed: int = 0) -> None:
        self._shared = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
        """logits [B, V] float32 (CPU or device) -> B token ids."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()  # [B]
        if all(p.greedy for p in params):
            return greedy
        out = list(greedy)
        for i, p in enumerate(params):
            if p.greedy:
                continue
            probs = self._filtered_probs(logits[i], p)  # [V]
            gen = generators[i] or self._shared
            out[i] = int(torch.multinomial(probs.cpu(), 1, generator=gen))
        return out

    @staticmethod
    def _filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        row = row / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass strictly above each token
            sorted_p = sorted_p.masked_fill(before >= p.top_p, 0.0)  # the top token always stays
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return probs / probs.sum()
