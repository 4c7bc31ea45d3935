"""Text output: the event logs, the block layout at the first fragmentation refusal, and the
side-by-side table of both allocators."""

from __future__ import annotations

from typing import Any

from radixkv.tools.simulate.results import Comparison, SimResult


def layout_bar(layout: tuple[tuple[int, int, str | None], ...], num_blocks: int,
               width: int = 50) -> str:
    """One line drawing a block array: owner initials for allocations, '.' for free blocks."""
    owners = [o for _, _, o in layout if o]
    initials = [o[0] for o in owners]
    if len(set(initials)) == len(initials):  # A, B, C: draw each with its initial
        char = dict(zip(owners, initials, strict=True))
    else:  # r0, r5, r6, ...: letters in layout order (describe_layout names them)
        char = {o: "abcdefghijklmnopqrstuvwxyz"[i % 26] for i, o in enumerate(owners)}
    cells = []
    for c in range(width):
        block = c * num_blocks // width
        owner = next((o for s, n, o in layout if s <= block < s + n), None)
        cells.append(char[owner] if owner else ".")
    return "|" + "".join(cells) + "|"


def describe_layout(layout: tuple[tuple[int, int, str | None], ...]) -> str:
    """'[0,40) free, [40,80) B, [80,100) free'."""
    return ", ".join(f"[{s},{s + n}) {o or 'free'}" for s, n, o in layout)


def format_summary(cmp: Comparison) -> str:
    """The side-by-side table of both allocators' measurements."""
    c, p = cmp.contiguous, cmp.paged

    def both(f: Any) -> tuple[str, str]:
        return f(c), f(p)

    def frag_count(r: SimResult) -> str:
        refused = r.refused_despite_free()
        n = len({x.request for x in refused})
        return f"{len(refused)} ({n} request{'s' * (n != 1)})"

    rows = [
        ("requests served", both(lambda r: str(len(r.finished)))),
        ("ticks until the last request finished", both(lambda r: str(r.makespan))),
        ("concurrent requests: mean / peak",
         both(lambda r: f"{r.running[:r.makespan].mean():.2f} / {r.running.max()}")),
        ("KV in use (utilisation): mean / peak",
         both(lambda r: f"{r.utilisation()[:r.makespan].mean():.1%} / "
                        f"{r.utilisation().max():.1%}")),
        ("internal fragmentation (reserved, unused)",
         both(lambda r: f"{r.internal_fragmentation()[:r.makespan].mean():.1%}")),
        ("external fragmentation (free outside largest hole)",
         both(lambda r: f"{r.external_fragmentation()[:r.makespan].mean():.1%}")),
        ("admissions refused", both(lambda r: str(len(r.refusals)))),
        ("  of which with enough blocks free", both(frag_count)),
        ("preemptions", both(lambda r: str(r.preemptions))),
        ("mean wait from arrival to admission (ticks)", both(lambda r: f"{r.mean_wait():.1f}")),
        ("mean time from arrival to finish (ticks)", both(lambda r: f"{r.mean_latency():.1f}")),
    ]
    w = max(len(k) for k, _ in rows)
    wc = max(len("contiguous"), *(len(v[0]) for _, v in rows))
    wp = max(len("paged"), *(len(v[1]) for _, v in rows))
    lines = [f"  {'':<{w}}  {'contiguous':>{wc}}  {'paged':>{wp}}",
             f"  {'-' * w}  {'-' * wc}  {'-' * wp}"]
    lines += [f"  {k:<{w}}  {a:>{wc}}  {b:>{wp}}" for k, (a, b) in rows]
    return "\n".join(lines)


def format_report(cmp: Comparison, events: bool = True, title: str = "") -> str:
    """Header, optional event logs, the layout at the first fragmentation refusal, the table."""
    c = cmp.contiguous
    head = [title or f"Fragmentation simulator: {len(c.trace)} requests on {c.num_blocks} blocks",
            "  1 block = one token's KV. contiguous: first-fit, each request reserves "
            "prompt + max_new_tokens blocks;",
            "  paged: radixkv TokenToKVPool, one slot per token, taken from anywhere as tokens "
            "are produced."]
    out = "\n".join(head) + "\n"
    if events:
        for r in (cmp.contiguous, cmp.paged):
            out += f"\nEvents ({r.allocator}):\n" + "\n".join(f"  {e}" for e in r.events) + "\n"
    frag = c.refused_despite_free()
    if frag:
        f = frag[0]
        out += (f"\nFirst refusal with enough memory free (contiguous, t={f.tick}):\n"
                f"  {layout_bar(f.layout, c.num_blocks)}  0..{c.num_blocks}\n"
                f"  {describe_layout(f.layout)}\n"
                f"  {f.free} blocks free, but the largest hole is {f.largest_hole} "
                f"< {f.need} that {f.request} must reserve.\n")
        p_adm = cmp.paged.admitted.get(f.request)
        if p_adm is not None:
            out += (f"  Paged admitted {f.request} at t={p_adm}; contiguous at "
                    f"t={c.admitted[f.request]}.\n")
    return out + "\n" + format_summary(cmp)
