"""Turns a scheduled `Batch` into one model forward: metadata in a `ForwardContext`, logits out."""

from __future__ import annotations

import numpy as np
import torch

from radixkv.attention import build_kv_indices
from radixkv.engine.scheduler import Batch
from radixkv.memory.kv_pool import TokenToKVPool
from radixkv.memory.req_pool import ReqToTokenPool
from radixkv.model import LoadedModel
from radixkv.model.context import forward_context, make_forward_context


class ModelRunner:
    """Owns the model call; the only engine part that knows tensor layouts and devices."""

    def __init__(self, lm: LoadedModel, kv_pool: TokenToKVPool, req_pool: ReqToTokenPool) -> None:
        self.model = lm.model
        self.device = lm.device
        self.kv_pool = kv_pool
        self.req_pool = req_pool

    def forward(self, batch: Batch) -> torch.Tensor:
        """Run the batch; returns float32 logits [items with `samples_next`, vocab] in item
        order."""
        items = batch.items
        starts = np.fromiter((it.start for it in items), dtype=np.int64, count=len(items))
        ends = np.fromiter((it.end for it in items), dtype=np.int64, count=len(items))
        if batch.is_decode:  # the last token of each request: prompt's end or the last sampled
            ids = np.fromiter((it.req.token_ids()[it.start] for it in items), dtype=np.int64,
                              count=len(items))
        else:
            ids = np.concatenate([it.req.token_ids()[it.start:it.end] for it in items])
        samples = np.fromiter((it.samples_next for it in items), dtype=bool, count=len(items))
        rows = torch.from_numpy(np.fromiter((it.req.row for it in items), dtype=np.int64,
                                            count=len(items)))
        rp = self.req_pool.device
        kv_indptr, kv_indices = build_kv_indices(self.req_pool.req_to_token, rows.to(rp),
                                                 torch.from_numpy(ends).to(rp))
        out_slots = items[0].slots if len(items) == 1 else torch.cat([it.slots for it in items])
        ctx = make_forward_context(self.kv_pool, starts=starts, ends=ends, out_slots=out_slots,
                                   kv_indptr=kv_indptr, kv_indices=kv_indices, logits=samples,
                                   is_decode=batch.is_decode, device=self.device)
        input_ids = torch.from_numpy(ids.astype(np.int64, copy=False)).to(self.device)
        with torch.inference_mode(), forward_context(ctx):
            return self.model(input_ids)
