"""Helpers of the server tests: the transformers oracle and /metrics readers."""

from __future__ import annotations

import time
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from radixkv.serving.launcher import ServerProcess


def hf_greedy(hf: Any, ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy continuation (EOS ignored) and the log-softmax rows that chose it [steps, V]."""
    model, _ = hf
    seq, rows = list(ids), []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1].float()
            rows.append(torch.log_softmax(logits, -1))
            seq.append(int(logits.argmax()))
    return seq[len(ids):], torch.stack(rows)


def chat_ids(hf: Any, messages: list[dict[str, str]]) -> list[int]:
    return list(hf[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=False))


def metrics(srv: ServerProcess) -> dict[str, float]:
    """The /metrics samples as {name{labels}: value}."""
    text = httpx.get(f"{srv.url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(srv: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """Metrics once nothing runs, waits or is admitted; asserts no KV slot leaked."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(srv)
        idle = (m["radixkv_num_requests_running"] == 0 and m["radixkv_num_requests_waiting"] == 0
                and m["radixkv_server_active_sequences"] == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert idle, f"server not idle after {timeout} s: {m}"
    assert m["radixkv_kv_pool_free_tokens"] + m["radixkv_kv_cached_tokens"] == \
        m["radixkv_kv_pool_size_tokens"], m
    return m
