"""The tables `python -m train bench` prints: per row tokens/s, its ratio to the first row, MFU,
peak memory, compilations, recomputed layers and loss drift; per round; and the longest rows."""

from __future__ import annotations

import statistics
from typing import Optional


def loss_drift(base: list[float], other: list[float], n: int = 50) -> Optional[float]:
    """Mean relative difference of the first n per-step losses (None without overlap)."""
    k = min(n, len(base), len(other))
    if not k:
        return None
    return statistics.fmean(abs(o - b) / abs(b) for b, o in zip(base[:k], other[:k]))


def table(results: list[dict]) -> str:
    base = results[0]
    head = (f"{'row':30} {'tok/s':>8} {'x base':>6} {'MFU':>6} {'peak GiB':>8} {'compiles':>8} "
            f"{'ckpt':>9} {'loss drift':>10}  losses (first, 10th, last)")
    lines = [head, "-" * len(head)]
    for r in results:
        tps = r.get("tokens_per_s")
        speedup = tps / base["tokens_per_s"] if tps and base.get("tokens_per_s") else None
        ck = r.get("checkpointed_layers")
        ck_s = f"{ck['min']}-{ck['max']}/{ck['of']}" if ck else ("trl all" if r["config"]["checkpoint"] == "trl" else "-")
        if ck and ck.get("selective"):
            ck_s += f" ({ck['selective']['min']}-{ck['selective']['max']} sel)"
        drift = loss_drift(base["losses"], r["losses"])
        ls = r["losses"]
        pick = [ls[0], ls[min(9, len(ls) - 1)], ls[-1]] if ls else []
        label = f"{r['row']} (round {r['round']})" if r.get("round") else r["row"]
        lines.append(
            f"{label:30} {tps or 0:8.0f} {speedup or 0:6.2f} "
            f"{(r.get('mfu') or 0) * 100:5.1f}% {r.get('peak_alloc_gib', 0):8.2f} {r['compilations']:8d} "
            f"{ck_s:>9} {'' if drift is None else f'{drift * 100:.3f}%':>10}  "
            + " ".join(f"{x:.4f}" for x in pick) + (f"  [{r['error']}]" if r.get("error") else "")
        )
    for r in results:
        steps = r.get("compiled_in_timed_steps")
        if steps:
            lines.append(f"note: {r['row']} compiled during timed step(s) {', '.join(map(str, steps))} (0-based): its "
                         "tok/s includes that compile time; give it more --warmup steps")
    return "\n".join(lines)


def rounds_table(results: list[dict]) -> str:
    """--rounds: each row's tok/s in every round (the odd rounds in the given order, the even ones
    reversed), their mean, and that mean against the first row's."""
    names = list(dict.fromkeys(r["row"] for r in results))
    rounds = max(r["round"] for r in results)
    speed = {(r["row"], r["round"]): r.get("tokens_per_s") or 0 for r in results}
    mean = {n: statistics.fmean(speed.get((n, k), 0) for k in range(1, rounds + 1)) for n in names}
    head = f"{'row':30} " + " ".join(f"{f'round {k}':>9}" for k in range(1, rounds + 1)) + f" {'mean':>9} {'x base':>6}"
    lines = [head, "-" * len(head)]
    for n in names:
        lines.append(f"{n:30} " + " ".join(f"{speed.get((n, k), 0):9.0f}" for k in range(1, rounds + 1))
                     + f" {mean[n]:9.0f} {mean[n] / mean[names[0]] if mean[names[0]] else 0:6.3f}")
    return "\n".join(lines)


def longest_table(results: list[dict]) -> str:
    """--longest: per row the longest row that trained, against the first row's."""
    base = results[0].get("longest_trained") or 0
    head = (f"{'row':30} {'longest':>9} {'x base':>6} {'failed at':>9} {'tries':>5} {'peak GiB':>8} "
            f"{'KiB/token':>9} {'fit (device)':>12} {'search s':>8}")
    lines = [head, "-" * len(head)]
    for r in results:
        longest = r.get("longest_trained") or 0
        peak = max((t["peak_gib"] or 0 for t in r.get("tries", []) if t["ok"] and t["length"] == longest), default=0)
        per_token = r.get("bytes_per_token")
        lines.append(
            f"{r['row']:30} {longest:9d} {longest / base if base else 0:6.2f} {r.get('shortest_failed') or '-':>9} "
            f"{len(r.get('tries', [])):5d} {peak:8.2f} {per_token / 1024 if per_token else 0:9.1f} "
            f"{r.get('longest_fit') or '-':>12} {r.get('search_s', 0):8.0f}"
            + (" (at --longest-max)" if r.get("at_ceiling") else "") + (f"  [{r['error']}]" if r.get("error") else "")
        )
    return "\n".join(lines)
