"""Turns a scheduled `Batch` into one model forward: metadata in a `ForwardContext`, logits out."""

from __future__ import annotations

import numpy as np
import torch

from radixkv.attention import build_kv_indices
from radixkv.engine.scheduler import Batch
from radixkv.memory.kv_pool import TokenToKVPool
from radixkv.memory.req_pool import ReqToTokenPool
from radixkv.model import LoadedModel
from radixkv.model.context import ForwardContext, forward_context


class ModelRunner:
    """Owns the model call; the only engine part that knows tensor layouts and devices."""

    def __init__(self, lm: LoadedModel, kv_pool: TokenToKVPool, req_pool: ReqToTokenPool) -> None:
        self.model = lm.model
        self.device = lm.device
        self.kv_pool = kv_pool
        self.req_pool = req_pool

    def forward(self, batch: Batch) -> torch.Tensor:
        """Run the batch; returns float32 logits [num items with `sample`, vocab] in item order."""
        items = batch.items
        starts = np.array([it.start for it in items], dtype=np.int64)
        ends = np.array([it.end for it in items], dtype=np.int64)
        lens = ends - starts
        qo_indptr = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lens, out=qo_indptr[1:])
        # positions: start_b, start_b + 1, ... for each request, without a Python loop per token
        positions = np.arange(qo_indptr[-1]) - np.repeat(qo_indptr[:-1] - starts, lens)
        if batch.is_decode:
            ids = np.array([it.req.output_ids[-1] if it.req.output_ids else
                            it.req.prompt_ids[-1] for it in items], dtype=np.int64)
        else:
            ids = np.concatenate([it.req.fill_ids()[it.start:it.end] for it in items])
        sample_rows = qo_indptr[1:][[it.sample for it in items]] - 1
        dev = self.device
        rows = torch.tensor([it.req.row for it in items], dtype=torch.int64)
        kv_indptr, kv_indices = build_kv_indices(self.req_pool.req_to_token,
                                                 rows.to(self.req_pool.device),
                                                 torch.from_numpy(ends).to(self.req_pool.device))
        ctx = ForwardContext(
            kv_pool=self.kv_pool,
            is_decode=batch.is_decode,
            positions=torch.from_numpy(positions).to(dev),
            out_slots=torch.cat([it.slots for it in items]).to(dev),
            qo_indptr=torch.from_numpy(qo_indptr).to(dev),
            kv_indptr=kv_indptr.to(dev),
            kv_indices=kv_indices.to(dev),
            logits_indices=torch.from_numpy(sample_rows).to(dev),
        )
        input_ids = torch.from_numpy(ids.astype(np.int64)).to(dev)
        with torch.inference_mode(), forward_context(ctx):
            return self.model(input_ids)
