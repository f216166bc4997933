"""report.md sections for decoders (family causal-lm): generation quality and speed, the memory plan, and what
each weight-only variant is. Empty for reports without decoder figures."""

from __future__ import annotations

from typing import Any

from edgepack.report.model import Report

#: the metrics the main table shows for a decoder (the rest are in the decoder section)
TABLE_KEYS = (("perplexity", "ppl"), ("next_token_agreement", "next-token agr."))


def _f(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def is_decoder(metrics: dict[str, Any]) -> bool:
    return "perplexity" in metrics and "decode_tokens_per_s" in metrics


def table_cell(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{short} {metrics[key]:.4f}" for key, short in TABLE_KEYS if metrics.get(key) is not None)


def decoder_lines(report: Report) -> list[str]:
    rows, plans = [], []
    ref_size = report.variants[report.reference].size_bytes
    contexts: list[int] = []
    for name, variant in report.variants.items():
        for ep, entry in variant.providers.items():
            m = entry.metrics
            if entry.status != "ok" or not is_decoder(m):
                continue
            contexts = sorted({int(k.removeprefix("peak_rss_mb_ctx")) for k in m if k.startswith("peak_rss_mb_ctx")}
                              | set(contexts))
            rss = " / ".join(_f(m.get(f"peak_rss_mb_ctx{c}"), ".0f") for c in contexts)
            rows.append(f"| {name} | {ep} | {variant.size_bytes / 1e6:.1f} ({variant.size_bytes / ref_size:.2f}) | "
                        f"{_f(m.get('perplexity'), '.3f')} ({_f(m.get('perplexity_ratio'), '.3f')}) | "
                        f"{_f(m.get('next_token_agreement'), '.3f')} | {_f(m.get('generation_agreement'), '.3f')} | "
                        f"{_f(m.get('ttft_ms'), '.1f')} | {_f(m.get('prefill_tokens_per_s'), '.0f')} | "
                        f"{_f(m.get('decode_tokens_per_s'), '.1f')} | {rss} |")
            if entry.memory_plan is not None:
                plans.append((name, ep, entry.memory_plan))
    if not rows:
        return []
    lines = ["## Decoder: quality, speed, memory", "",
             "Perplexity and next-token agreement are teacher-forced on the held-out windows; generation agreement is "
             "the share of identical greedy tokens position by position (one early difference changes the rest); "
             "ratios and agreements are against the variant each was made from. Batch 1.", "",
             "| variant | EP | size MB (×) | perplexity (×) | next-token agr. | generation agr. | TTFT ms | "
             f"prefill tok/s | decode tok/s | peak RSS MB at {' / '.join(map(str, contexts))} |",
             "|---|---|---|---|---|---|---|---|---|---|", *rows, ""]
    for name, ep, plan in plans:
        fits = ", ".join(f"{f.budget_mb:.0f} MB: {f.longest_context if f.fits else 'does not fit'}" for f in plan.fits)
        points = "; ".join(f"{p.context}: {p.peak_rss_mb:.0f} measured / {_f(p.predicted_mb, '.0f')} predicted"
                           for p in plan.points)
        lines += [f"- memory plan, {name} on {ep}: weights {plan.weight_bytes / 2**20:.1f} MiB; KV cache "
                  f"{plan.kv_dtype}: {plan.kv_formula}; measured slope {_f(plan.measured_bytes_per_token, '.0f')} "
                  f"bytes/token (predicted {plan.kv_copies_predicted} x {plan.kv_bytes_per_token}); peak RSS MB "
                  f"{points}; longest context that fits {fits}"]
    return [*lines, ""]


def _mixed_budget(mixed: dict[str, Any]) -> str:
    """The mixed plan's budget and what it reached on calibration text (fake quantization)."""
    if "max_perplexity_ratio" in mixed:
        return (f"budget {mixed['max_perplexity_ratio']} x FP32 calibration perplexity, calibration ratio "
                f"{mixed['calibration_perplexity_ratio_fake_quant']:.4f} (fake-quant)")
    return (f"budget cosine >= {1 - mixed['max_cosine_drop']:.4f} to FP32 on calibration text, calibration cosine "
            f"{mixed['calibration_cosine_fake_quant']:.4f} (fake-quant)")


def weight_only_lines(q: dict[str, Any]) -> list[str]:
    lines = ["## Weight-only quantization", ""]
    for name, m in (q.get("variants") or {}).items():
        lines.append(f"- {name}: {m.get('bits')}-bit {m.get('method')}, block {m.get('block_size')}, "
                     f"{'symmetric' if m.get('symmetric') else 'asymmetric'}, accuracy_level {m.get('accuracy_level')}"
                     f"; {m.get('embedding', '')}; size {_f(m.get('size_ratio'), '.3f')} x FP32")
        mixed = m.get("mixed")
        if mixed:
            lines.append(f"  - mixed: {_mixed_budget(mixed)}, {len(mixed['promoted'])} of {mixed['units']} units at "
                         f"INT{mixed['promote_bits']} ({', '.join(mixed['promoted']) or 'none'}); "
                         f"{'met' if mixed['met_on_calibration'] else 'NOT met'}")
    return [*lines, ""]
