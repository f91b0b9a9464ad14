"""Human-readable views of a chimera model's variants (used by the demo and the CLI)."""

from __future__ import annotations

from mlflow_chimera.manifest import BUILD_FAILED, FAILED_PARITY, READY

# How a variant's status reads to a person: tables, the report, tags, the chart. (The
# registry plugin, which runs on tracking servers without this package, keeps its own copy.)
STATUS_WORDS = {READY: "passed", FAILED_PARITY: "failed parity", BUILD_FAILED: "build failed"}


def status_word(variant) -> str:
    """``passed`` / ``failed parity`` / ``build failed`` (the raw status for anything else)."""
    return STATUS_WORDS.get(variant.status, variant.status)


def parity_word(variant) -> str:
    """The parity column: the status word, or ``-`` for a ready variant that was never checked."""
    if variant.status == READY and variant.parity is None:
        return "-"
    if variant.status == READY and not variant.parity.passed:
        return STATUS_WORDS[FAILED_PARITY]
    return status_word(variant)


def _fmt_ms(value) -> str:
    return "-" if value is None else (f"{value * 1000:.1f} µs" if value < 1 else f"{value:.2f} ms")


def variant_rows(variants: list, host_class: str, chosen_id: str | None = None) -> list:
    """One dict per variant: id, backend, precision, parity, max abs error, p50 at each
    measured batch on ``host_class``, and whether this host loads it."""
    rows = []
    for v in variants:
        bench = v.benchmark_for(host_class)
        parity = parity_word(v)
        rows.append({
            "variant": v.id,
            "backend": v.backend,
            "precision": v.precision,
            "parity": parity,
            "max_abs_err": None if v.parity is None else v.parity.max_abs,
            "p50_ms": {} if bench is None else {b: r["p50"] for b, r in bench.latency_ms.items()},
            "loads_here": v.id == chosen_id,
        })
    return rows


def variant_table(variants: list, host_class: str, chosen_id: str | None = None) -> str:
    """The variant table as aligned text, fastest measured first."""
    rows = variant_rows(variants, host_class, chosen_id)
    batches = sorted({b for r in rows for b in r["p50_ms"]}, key=int)
    header = ["variant", "backend", "precision", "parity", "max abs err"] + \
        [f"p50 @ batch {b}" for b in batches] + ["this host"]
    rank_batch = batches[0] if batches else None
    rows.sort(key=lambda r: (r["p50_ms"].get(rank_batch) is None, r["p50_ms"].get(rank_batch) or 0))
    body = []
    for r in rows:
        err = "-" if r["max_abs_err"] is None or r["max_abs_err"] != r["max_abs_err"] else f"{r['max_abs_err']:.1e}"
        body.append([r["variant"], r["backend"], r["precision"], r["parity"], err] +
                    [_fmt_ms(r["p50_ms"].get(b)) for b in batches] + ["<- loads" if r["loads_here"] else ""])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in body])
