"""One table over many evaluations: ``python -m wakd.report RUN_DIR... [--out DIR]``.

Reads every results.json below the given run directories (Hydra multirun directories
included), puts them in one table, rows models (model name and weights hash), columns
dataset/split x R@N, and writes ``report.md`` (the table, then each dataset's protocol card and
each model's descriptive fields), ``report.csv`` and ``report.png`` (the table as a picture)
into ``--out`` (default: the first run directory). Results for one dataset column must share
every protocol field of their cards (:mod:`wakd.eval.protocol`): otherwise the report
refuses, naming the field and both values. ``python eval.py -m dataset=a,b`` writes the same
report into its sweep directory when the sweep ends (:class:`MultirunReport`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hydra.experimental.callback import Callback
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wakd.atomic import atomic_write_bytes, atomic_write_text
from wakd.eval.protocol import check_same_protocol
from wakd.eval.report import RESULTS_NAME

REPORT_NS = (1, 5, 10)
# Card fields shown in the Markdown, in this order.
PROTOCOL_SHOWN = (
    "variant", "split", "num_queries", "num_database", "queries_without_positive", "pos_dist_thr",
    "image_size", "panorama_dedup", "time_rule", "file_list_sha256",
)
DESCRIPTIVE_SHOWN = ("checkpoint", "pca", "search", "seed", "selected_on", "wakd_version", "git_commit")


class ReportError(ValueError):
    """Results that cannot be put in one table; the message names the files and the reason."""


@dataclass(frozen=True)
class Entry:
    """One results.json: where it lies, its recall {n: fraction} and its card."""

    path: Path
    recall: dict[int, float]
    card: dict[str, Any]

    @property
    def dataset(self) -> str:
        """The column: dataset and split (a dataset's val and test are two test sets)."""
        protocol = self.card["protocol"]
        return f"{protocol['dataset']}/{protocol['split']}"

    @property
    def model(self) -> str:
        described = self.card["descriptive"]
        weights = described.get("weights_sha256") or "no-weights"
        return f"{described['model']} {weights[:8]}"


def find_results(run_dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """Every results.json below ``run_dirs`` (or the files themselves), sorted; a directory
    without any is an error naming it."""
    found: list[Path] = []
    for run_dir in map(Path, run_dirs):
        if run_dir.is_file() and run_dir.name == RESULTS_NAME:
            found.append(run_dir)
            continue
        if not run_dir.is_dir():
            raise ReportError(f"{run_dir}: no such directory (give run directories written by eval.py)")
        below = sorted(run_dir.rglob(RESULTS_NAME))
        if not below:
            raise ReportError(f"{run_dir}: no {RESULTS_NAME} below it (is it an eval.py run directory?)")
        found.extend(below)
    return sorted(set(found))


def read_entry(path: Path) -> Entry:
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportError(f"{path}: cannot read it as JSON ({err})") from None
    card = results.get("card") if isinstance(results, dict) else None
    if not isinstance(card, dict) or not {"protocol", "descriptive"} <= card.keys():
        raise ReportError(
            f"{path}: no protocol card ('card' with 'protocol' and 'descriptive'); it was written by an "
            "older eval.py: evaluate again to compare it"
        )
    return Entry(path, {int(n): float(v) for n, v in results["recall"].items()}, card)


def build_table(entries: Sequence[Entry]) -> tuple[list[str], list[str], dict[tuple[str, str], Entry]]:
    """(models, datasets, {(model, dataset): entry}) after checking each column's protocols."""
    datasets = sorted({e.dataset for e in entries})
    for dataset in datasets:
        check_same_protocol((str(e.path), e.card) for e in entries if e.dataset == dataset)
    cells: dict[tuple[str, str], Entry] = {}
    for entry in entries:
        key = (entry.model, entry.dataset)
        if key in cells:
            raise ReportError(
                f"two results for model {entry.model} on {entry.dataset}: {cells[key].path} and {entry.path}; "
                "give the report only one of them"
            )
        cells[key] = entry
    models = sorted({e.model for e in entries})
    return models, datasets, cells


def _percent(entry: Entry | None, n: int) -> str:
    return f"{100 * entry.recall[n]:.1f}" if entry is not None and n in entry.recall else "-"


def _cell(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|")


def markdown(models: list[str], datasets: list[str], cells: dict[tuple[str, str], Entry], ns: Sequence[int]) -> str:
    header = ["Model", *(f"{d} R@{n}" for d in datasets for n in ns)]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for model in models:
        row = [_percent(cells.get((model, d)), n) for d in datasets for n in ns]
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    lines += ["", "## Protocols (identical for every result of a column)", ""]
    lines += ["| Dataset | " + " | ".join(PROTOCOL_SHOWN) + " |", "|---|" + "---|" * len(PROTOCOL_SHOWN)]
    for dataset in datasets:
        protocol = next(e for (_, d), e in cells.items() if d == dataset).card["protocol"]
        lines.append(f"| {dataset} | " + " | ".join(_cell(protocol.get(f)) for f in PROTOCOL_SHOWN) + " |")
    lines += ["", "## Models", ""]
    lines += ["| Model | Dataset | " + " | ".join(DESCRIPTIVE_SHOWN) + " |", "|---|---|" + "---|" * len(DESCRIPTIVE_SHOWN)]
    for (model, dataset), entry in sorted(cells.items()):
        described = entry.card["descriptive"]
        lines.append(f"| {model} | {dataset} | " + " | ".join(_cell(described.get(f)) for f in DESCRIPTIVE_SHOWN) + " |")
    return "\n".join(lines) + "\n"


def csv_text(models: list[str], datasets: list[str], cells: dict[tuple[str, str], Entry], ns: Sequence[int]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "weights_sha256", "checkpoint", *(f"{d} R@{n}" for d in datasets for n in ns)])
    for model in models:
        described = next(e for (m, _), e in sorted(cells.items()) if m == model).card["descriptive"]
        row = [_percent(cells.get((model, d)), n) for d in datasets for n in ns]
        writer.writerow([model, described.get("weights_sha256") or "", described.get("checkpoint") or "", *row])
    return buf.getvalue()


def picture(models: list[str], datasets: list[str], cells: dict[tuple[str, str], Entry], ns: Sequence[int]) -> bytes:
    """The table as a PNG heat map: Recall@N in percent, one cell per model x (dataset, N)."""
    columns = [(d, n) for d in datasets for n in ns]
    values = np.array(
        [[100 * cells[(m, d)].recall.get(n, np.nan) if (m, d) in cells else np.nan for d, n in columns] for m in models]
    )  # [models, datasets * ns]
    fig = Figure(figsize=(2.0 + 1.0 * len(columns), 1.2 + 0.45 * len(models)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (i, j), value in np.ndenumerate(values):
        ax.text(j, i, "-" if np.isnan(value) else f"{value:.1f}", ha="center", va="center",
                color="black" if np.isnan(value) or value >= 60 else "white", fontsize=8)
    ax.set_xticks(range(len(columns)), [f"{d}\nR@{n}" for d, n in columns], fontsize=7)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_title("Recall@N (%)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_report(
    run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None, ns: Sequence[int] = REPORT_NS
) -> dict[str, Path]:
    """Read the results below ``run_dirs`` and write report.{md,csv,png} into ``out_dir``
    (default: the first run directory); returns their paths. Raises ReportError or
    :class:`wakd.eval.protocol.ProtocolMismatch` before writing anything."""
    if not run_dirs:
        raise ReportError("give at least one run directory")
    entries = [read_entry(p) for p in find_results(run_dirs)]
    models, datasets, cells = build_table(entries)
    first = Path(run_dirs[0])
    out = Path(out_dir) if out_dir is not None else (first.parent if first.is_file() else first)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(models, datasets, cells, ns)
    sources = "\n".join(f"- {e.path}" for e in entries)
    return {
        "md": atomic_write_text(out / "report.md", f"# Recall@N\n\n{table}\n## Sources\n\n{sources}\n"),
        "csv": atomic_write_text(out / "report.csv", csv_text(models, datasets, cells, ns)),
        "png": atomic_write_bytes(out / "report.png", picture(models, datasets, cells, ns)),
    }


class MultirunReport(Callback):
    """Hydra callback (configs/eval.yaml): the report of a sweep, written into its directory."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        paths = write_report([config.hydra.sweep.dir])
        print(f"report of the sweep: {paths['md']}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wakd.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="eval.py run or multirun directories")
    parser.add_argument("--out", default=None, help="where report.{md,csv,png} go (default: the first RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.run_dirs, args.out)
    except ValueError as err:  # ReportError, ProtocolMismatch
        print(f"error: {err}", file=sys.stderr)
        return 2
    print((paths["md"]).read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
