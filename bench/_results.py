"""Shared helper for benchmarks: merge numbers into bench/results.json and
replace one delimited section of bench/RESULTS.md, leaving everything else alone."""

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


def machine() -> str:
    """One line naming the CPU, its core count and today's date (UTC)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{cpu}, {cores} cores, {date}"


def merge_results(values: dict[str, Any], path: Path = RESULTS_JSON) -> None:
    """Add or overwrite ``values`` in the results JSON, keeping the other keys."""
    with _locked():
        results = json.loads(path.read_text()) if path.exists() else {}
        results.update(values)
        atomic_write_json(path, results)


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
