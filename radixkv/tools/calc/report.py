"""Text output of the calculator: the budget table `radixkv calc` prints and the presets list."""

from __future__ import annotations

from radixkv.tools.calc.capacity import KVBudget, kv_bytes_per_token, kv_dtype_bytes
from radixkv.tools.calc.presets import PRESETS


def format_bytes(n: int | float) -> str:
    """Binary units with one decimal (327680 -> '320.0 KiB'); bytes below 1 KiB as integers."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.{2 if abs(n) < 10 else 1}f} {unit}"
    raise AssertionError("unreachable")


def _table(rows: list[tuple[str, str]], headers: tuple[str, str] = ("quantity", "value")) -> str:
    w = max(len(headers[0]), *(len(r[0]) for r in rows))
    lines = [f"  {headers[0]:<{w}}  {headers[1]}", f"  {'-' * w}  {'-' * 40}"]
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


def format_budget(b: KVBudget) -> str:
    """The table `radixkv calc` prints for one budget."""
    m = b.model
    v_dim = m.v_head_dim if m.v_head_dim is not None else m.head_dim
    dims = f"{m.head_dim} head_dim" if v_dim == m.head_dim else f"{m.head_dim}+{v_dim} K+V dims"
    factor = "2 x " if v_dim == m.head_dim else ""
    head = [f"KV cache budget: {m.name}  ({m.source})",
            f"  {m.num_layers} layers x {m.num_kv_heads} KV heads x {dims}; "
            f"KV dtype {b.kv_dtype} ({b.kv_dtype_bytes} B); tensor parallel {b.tp}"
            + (f"; page size {b.page_size}" if b.page_size > 1 else ""), ""]
    elems = (f"{factor}{m.num_layers} x {m.num_kv_heads} x "
             f"{m.head_dim if v_dim == m.head_dim else m.head_dim + v_dim} x {b.kv_dtype_bytes} B")
    rows = [("KV bytes per token", f"{format_bytes(b.bytes_per_token)} "
                                   f"({b.bytes_per_token:,} B = {elems})")]
    if b.tp > 1:
        rows.append(("KV bytes per token per GPU",
                     f"{format_bytes(b.bytes_per_token_per_gpu)} "
                     f"({b.kv_heads_per_gpu} KV head{'s' * (b.kv_heads_per_gpu > 1)} per GPU)"))
    rows.append(("KV bytes per request", f"{format_bytes(b.bytes_per_request)} "
                                         f"({b.context_len:,} tokens)"))
    rows.append(("GPU memory usable", f"{format_bytes(b.usable_bytes_per_gpu)} per GPU "
                                      f"({format_bytes(b.gpu_mem_bytes)} x {b.mem_fraction:g})"))
    if b.weight_bytes is None:
        rows.append(("weights", b.weight_source))
    else:
        per = f", {format_bytes(b.weight_bytes_per_gpu)} per GPU" if b.tp > 1 else ""
        rows.append(("weights", f"{format_bytes(b.weight_bytes)}{per} ({b.weight_source})"))
    na = "n/a (weights unknown)"
    if b.kv_pool_bytes_per_gpu is None:
        rows += [("KV pool", na), ("tokens that fit", na)]
    else:
        rows.append(("KV pool", f"{format_bytes(b.kv_pool_bytes_per_gpu)} per GPU"))
        rows.append(("tokens that fit", f"{b.tokens_fit:,}"))
    ctx = f"requests of {b.context_len:,} tokens"
    rows.append(("concurrent requests (paged)",
                 na if b.concurrent_requests is None else f"{b.concurrent_requests:,} {ctx}"))
    if b.contiguous_requests is None:
        rows.append(("contiguous reservation instead", na))
    else:
        waste = 1 - b.context_len / b.max_len
        rows.append(("contiguous reservation instead",
                     f"{b.contiguous_requests:,} requests (each reserves max length "
                     f"{b.max_len:,}; {waste:.0%} of a reservation unused)"))
    out = "\n".join(head) + "\n" + _table(rows)
    if b.notes:
        out += "\n" + "\n".join(f"  note: {n}" for n in b.notes)
    return out


def format_presets(dtype: str = "fp16") -> str:
    """One line per preset: shape, parameters and KV bytes per token in `dtype`."""
    name, _ = kv_dtype_bytes(dtype)
    header = ("preset", "layers", "KV heads", "head_dim", "params", f"KV/token {name}",
              "max ctx")
    rows = []
    for key, spec in PRESETS.items():
        params = spec.params
        rows.append((key, str(spec.num_layers), str(spec.num_kv_heads), str(spec.head_dim),
                     f"{params / 1e9:.2f} B" if params else "?",
                     format_bytes(kv_bytes_per_token(spec, name)),
                     f"{spec.max_context:,}" if spec.max_context else "?"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)
