"""Comparison reports of several results files: a markdown table and a grouped bar chart of headline metrics."""

from __future__ import annotations

import math
import os
from pathlib import Path

from zeroshot.results import Results, read_results


def column_labels(results: list[Results], paths: list[Path]) -> list[str]:
    """One label per results file: the model (and pretrained file) name, lengthened with parent folders where
    names repeat (runs/a/model.safetensors and runs/b/model.safetensors become a/model... and b/model...),
    then with the results file's path if even the full names are equal."""

    def name(r: Results, parts: int) -> str:
        label = "/".join(Path(r.model).parts[-parts:])
        return label + (f" ({'/'.join(Path(r.pretrained).parts[-parts:])})" if r.pretrained else "")

    depth = [1] * len(results)
    labels = [name(r, 1) for r in results]
    for _ in range(max((len(Path(r.model).parts) for r in results), default=1)):
        clashes = [i for i, label in enumerate(labels) if labels.count(label) > 1]
        if not clashes:
            return labels
        for i in clashes:
            depth[i] += 1
            labels[i] = name(results[i], depth[i])
    return [f"{label} [{paths[i]}]" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def task_label(task: str, metrics: dict[str, float]) -> str:
    """The task as a report shows it: with its shots when few-shot (adapted heads, few-shot probes)."""
    shots = metrics.get("shots")
    return f"{task} ({int(shots)}-shot)" if shots is not None and not math.isnan(shots) else task


def comparison_rows(results: list[Results]) -> list[tuple[str, str, str, list[float | None]]]:
    """(task, benchmark, metric, headline value per file or None) for every task/benchmark/language any file has;
    a benchmark evaluated in another language than English is shown as `name [language]`; a task is labelled with
    its shots when every file ran it at the same k."""
    keys: dict[tuple[str, str, str], str] = {}
    labels: dict[tuple[str, str, str], set[str]] = {}
    for res in results:
        for e in res.results:
            keys.setdefault(e.key, e.metric)
            labels.setdefault(e.key, set()).add(task_label(e.task, e.metrics))
    rows = []
    for (task, bench, language), metric in keys.items():
        values = []
        for res in results:
            e = res.get(task, bench, language)
            values.append(e.headline if e is not None else None)
        shown = labels[(task, bench, language)]
        name = bench if language == "en" else f"{bench} [{language}]"
        rows.append((shown.pop() if len(shown) == 1 else task, name, metric, values))
    return rows


def markdown_table(results: list[Results], paths: list[Path]) -> str:
    """Headline metrics in percent, one row per task/benchmark, one column per file, with each column's mean."""
    labels = column_labels(results, paths)
    rows = comparison_rows(results)
    lines = ["| task | benchmark | metric | " + " | ".join(labels) + " |",
             "|---|---|---|" + "---:|" * len(labels)]
    for task, bench, metric, values in rows:
        cells = ["—" if v is None or math.isnan(v) else f"{100 * v:.1f}" for v in values]
        lines.append(f"| {task} | {bench} | {metric} | " + " | ".join(cells) + " |")
    means = []
    for col in range(len(labels)):
        vals = [v[col] for *_, v in rows if v[col] is not None and not math.isnan(v[col])]
        means.append(f"{100 * sum(vals) / len(vals):.1f} ({len(vals)})" if vals else "—")
    lines.append("| **mean** | (benchmarks) | | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(results: list[Results], paths: list[Path], out: Path) -> Path:
    """A grouped bar chart (one group per task/benchmark, one bar per file) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = column_labels(results, paths)
    rows = comparison_rows(results)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(rows) * max(1, len(labels)) + 2), 4.5))
    for col, label in enumerate(labels):
        xs = [i + (col - (len(labels) - 1) / 2) * width for i in range(len(rows))]
        ys = [100 * v[col] if v[col] is not None and not math.isnan(v[col]) else 0.0 for *_, v in rows]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([b if t == "zeroshot" else f"{b}\n{t}" for t, b, _, _ in rows], rotation=45, ha="right")
    ax.set_ylabel("headline metric (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(paths: list[str | os.PathLike], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write report.md and report.png comparing the results files at `paths`; returns both paths."""
    files = [Path(p) for p in paths]
    results = [read_results(p) for p in files]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    sources = "\n".join(f"- `{p}`: model `{r.model}`" + (f", pretrained `{r.pretrained}`" if r.pretrained else "")
                        + f", written {r.date}" for p, r in zip(files, results))
    md.write_text("# Evaluation report\n\nHeadline metric of each benchmark, in percent.\n\n"
                  + markdown_table(results, files) + "\n![headline metrics](report.png)\n\n## Sources\n\n"
                  + sources + "\n")
    return md, bar_chart(results, files, out / "report.png")
