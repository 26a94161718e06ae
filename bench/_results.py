"""Shared helper for benchmarks: merge numbers into bench/results.json and
replace one delimited section of bench/RESULTS.md, leaving everything else alone.

results.json maps each key to ``{"value", "date", "machine", "load"}``: when, where and
under what load average (1, 5, 15 min) that figure was measured. Every merge also
rewrites RESULTS.md's ``current`` section, the table of all of them."""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import platform
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wakd.atomic import atomic_write_json, atomic_write_text

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_JSON = BENCH_DIR / "results.json"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialise read-modify-write cycles of benchmarks that finish at the same time.

    The lock is on the bench folder itself: the result files are replaced by rename,
    so a lock on them would not outlive one write, and a lock file would litter git.
    """
    fd = os.open(BENCH_DIR, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def machine_name() -> str:
    """The CPU and its core count."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def machine() -> str:
    """One line naming the CPU, its core count and the time (UTC)."""
    return f"{machine_name()}, {now()}"


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def merge_results(
    values: dict[str, Any], path: Path = RESULTS_JSON, load: str | None = None, md_path: Path | None = None
) -> None:
    """Add or overwrite ``values`` in the results JSON with today's date, this machine and
    ``load`` (the load average while they were measured; default: now), keeping the other
    keys; then rewrite the current table (in ``md_path``, default RESULTS.md beside ``path``)."""
    stamp = {"date": now(), "machine": machine_name(), "load": load or load_average()}
    with _locked():
        results = json.loads(path.read_text()) if path.exists() else {}
        results.update({key: {"value": value, **stamp} for key, value in values.items()})
        atomic_write_json(path, results)
    replace_section("current", current_table(results), md_path or path.with_name(RESULTS_MD.name))


def current_table(results: dict[str, dict[str, Any]]) -> str:
    """The Markdown table of every figure in results.json with its provenance."""
    rows = "\n".join(
        f"| `{key}` | {entry['value']} | {entry['date']} | {entry['machine']} | {entry['load']} |"
        for key, entry in sorted(results.items())
    )
    return f"""
## Current figures (bench/results.json)

Each figure as last measured: when, on what, and the load average (1, 5, 15 min) of the
shared cores. How each is defined: its script's section in the log below.

| key | value | measured | machine | load |
|---|---:|---|---|---|
{rows}
"""


def values(path: Path = RESULTS_JSON) -> dict[str, Any]:
    """results.json's figures without their provenance: key -> value."""
    return {key: entry["value"] for key, entry in json.loads(path.read_text()).items()}


def replace_section(tag: str, body: str, path: Path = RESULTS_MD) -> None:
    """Put ``body`` between ``<!-- tag -->`` and ``<!-- /tag -->`` in the Markdown file,
    replacing that section if present and appending it otherwise."""
    start, end = f"<!-- {tag} -->", f"<!-- /{tag} -->"
    section = f"{start}\n{body.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), flags=re.DOTALL)
    with _locked():
        text = path.read_text() if path.exists() else "# Benchmark results\n"
        if pattern.search(text):
            text = pattern.sub(lambda _: section, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        atomic_write_text(path, text)
