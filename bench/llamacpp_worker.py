"""llama.cpp side of bench/quant.py, run in llama-cpp-python's own venv (it never imports
radixkv). Reads one JSON command per line on stdin and answers one JSON line on stdout.

Commands: load (path, threads), sequential (prompts, max_tokens: one request at a time through
`Llama.generate`, whose built-in prefix reuse keeps the shared system prompt), batched (prompts,
max_tokens[, kv_unified, flash_attn]: all requests in one multi-sequence context, the shared
prefix evaluated once and copied to every sequence, then one decode batch per step), prefill
(ids), memory.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys
import time

import numpy as np


class Worker:
    def __init__(self) -> None:
        self.llm = None
        self.threads = 2

    def load(self, path: str, threads: int) -> dict:
        from llama_cpp import Llama

        self.threads = threads
        self.path = path
        self.llm = Llama(model_path=path, n_ctx=4096, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        return {"ok": True}

    def _greedy(self, tokens: list[int], max_tokens: int) -> list[int]:
        out = []
        for tok in self.llm.generate(tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                     repeat_penalty=1.0, reset=True):
            out.append(int(tok))
            if len(out) == max_tokens:
                break
        return out

    def sequential(self, prompts: list[list[int]], max_tokens: int) -> dict:
        start = time.perf_counter()
        outs = [self._greedy(p, max_tokens) for p in prompts]
        return {"wall": time.perf_counter() - start, "tokens": outs}

    def prefill(self, ids: list[int]) -> dict:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(ids)
        wall = time.perf_counter() - start
        self.llm.reset()
        return {"wall": wall}

    def memory(self) -> dict:
        import llama_cpp

        return {"model_bytes": int(llama_cpp.llama_model_size(self.llm.model)),
                "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}

    def batched(self, prompts: list[list[int]], max_tokens: int, kv_unified: bool = True,
                flash_attn: int = -1) -> dict:
        """kv_unified: one cell pool for all sequences (a copied prefix shared, attention over
        every cell with a mask) or one stream per sequence (the prefix copied into each, each
        sequence attending to its own cells); flash_attn: llama.cpp's -1 auto, 0 off, 1 on."""
        import llama_cpp as L

        n = len(prompts)
        shared = 0
        for col in zip(*prompts, strict=False):
            if len(set(col)) != 1:
                break
            shared += 1
        shared = min(shared, min(len(p) for p in prompts) - 1)
        cp = L.llama_context_default_params()
        longest = max(map(len, prompts)) + max_tokens
        if kv_unified:
            need = shared + n * (longest - shared)
        else:  # n streams of n_ctx / n cells each
            need = n * (-(-longest // 256) * 256)
        cp.n_ctx = -(-need // 4096) * 4096
        cp.n_batch = 512
        cp.n_ubatch = 512
        cp.n_seq_max = n
        cp.n_threads = cp.n_threads_batch = self.threads
        if hasattr(cp, "kv_unified"):
            cp.kv_unified = kv_unified
        if hasattr(cp, "flash_attn_type"):
            cp.flash_attn_type = flash_attn
        new_ctx = getattr(L, "llama_init_from_model", None) or L.llama_new_context_with_model
        ctx = new_ctx(self.llm.model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a multi-sequence context")
        vocab = L.llama_model_get_vocab(self.llm.model) if hasattr(L, "llama_model_get_vocab") \
            else None
        n_vocab = (L.llama_vocab_n_tokens(vocab) if vocab is not None
                   else L.llama_n_vocab(self.llm.model))
        batch = L.llama_batch_init(512, 0, n)

        def argmax(row: int) -> int:
            ptr = L.llama_get_logits_ith(ctx, row)
            return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                             shape=(n_vocab,)).argmax())

        def run(items: list[tuple[int, int, list[int], bool]]) -> list[int]:
            """items: (token, pos, seq ids, wants logits), decoded in chunks of 512; returns
            the greedy next token of every row that wants logits, in order."""
            picked: list[int] = []
            for a in range(0, len(items), 512):
                chunk = items[a:a + 512]
                rows = []
                for i, (tok, pos, seqs, logit) in enumerate(chunk):
                    batch.token[i] = tok
                    batch.pos[i] = pos
                    batch.n_seq_id[i] = len(seqs)
                    for j, s in enumerate(seqs):
                        batch.seq_id[i][j] = s
                    batch.logits[i] = logit
                    if logit:
                        rows.append(i)
                batch.n_tokens = len(chunk)
                if L.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed")
                picked += [argmax(r) for r in rows]
            return picked

        def seq_cp(src: int, dst: int) -> None:
            if hasattr(L, "llama_memory_seq_cp"):
                L.llama_memory_seq_cp(L.llama_get_memory(ctx), src, dst, -1, -1)
            elif hasattr(L, "llama_kv_self_seq_cp"):
                L.llama_kv_self_seq_cp(ctx, src, dst, -1, -1)
            else:
                L.llama_kv_cache_seq_cp(ctx, src, dst, -1, -1)

        try:
            start = time.perf_counter()
            # the shared prefix once, in sequence 0, then copied to the others
            run([(t, i, [0], False) for i, t in enumerate(prompts[0][:shared])])
            for s in range(1, n):
                seq_cp(0, s)
            items = [(t, shared + i, [s], i == len(p) - shared - 1)
                     for s, p in enumerate(prompts) for i, t in enumerate(p[shared:])]
            outs = [[t] for t in run(items)]
            pos = [len(p) for p in prompts]
            for _ in range(max_tokens - 1):
                nxt = run([(outs[s][-1], pos[s], [s], True) for s in range(n)])
                for s in range(n):
                    outs[s].append(nxt[s])
                    pos[s] += 1
            wall = time.perf_counter() - start
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)
        return {"wall": wall, "tokens": outs, "shared": shared, "n_ctx": cp.n_ctx}


def main() -> None:
    worker = Worker()
    for line in sys.stdin:
        cmd = json.loads(line)
        name = cmd.pop("cmd")
        try:
            reply = getattr(worker, name)(**cmd)
        except Exception as exc:  # reported to the bench, which prints it
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    os._exit(0)  # skip llama.cpp's static teardown (it aborts on some builds)


if __name__ == "__main__":
    main()
