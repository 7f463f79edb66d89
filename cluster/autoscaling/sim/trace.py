"""Recorded traffic: one row per request arrival.

CSV (header required; extra columns ignored):

    timestamp,prompt_tokens,output_tokens,expert_skew
    0.412,812,245,
    0.977,1530,96,12:6;40:3

JSONL (one object per line):

    {"timestamp": 0.412, "prompt_tokens": 812, "output_tokens": 245}
    {"timestamp": 0.977, "prompt_tokens": 1530, "output_tokens": 96, "expert_skew": {"12": 6, "40": 3}}

- timestamp: seconds; any origin (the trace is shifted to start at 0), need not be sorted.
- prompt_tokens >= 1, output_tokens >= 1.
- expert_skew (optional): routing weight multipliers per logical expert for this request, applied
  in every MoE layer on top of the model's base popularity (`12:6` makes expert 12 six times as
  likely to be picked). Empty or absent means the base routing.
Files ending in `.gz` are read through gzip.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Skew = tuple[tuple[int, float], ...]


class TraceError(ValueError):
    """A trace file is malformed; the message names the file, line and column."""


@dataclass(frozen=True)
class Trace:
    """Arrivals sorted by time; `skew_id[i]` indexes `skews` (0 is the base routing)."""

    name: str
    arrival_s: np.ndarray  # float64, sorted, starts at 0
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    skew_id: np.ndarray  # int32
    skews: tuple[Skew, ...]  # skews[0] == ()

    def __len__(self) -> int:
        return int(self.arrival_s.size)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self) else 0.0


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return path.open(encoding="utf-8")


def _parse_skew(value: object, where: str) -> Skew:
    if value in (None, ""):
        return ()
    items: Iterable[tuple[object, object]]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, str):
        try:
            items = [tuple(part.split(":", 1)) for part in value.split(";") if part.strip()]
        except ValueError:
            raise TraceError(f"{where}: expert_skew {value!r} is not 'expert:weight;...'") from None
    else:
        raise TraceError(f"{where}: expert_skew must be 'expert:weight;...' or a mapping, got {value!r}")
    out = []
    for expert, weight in items:
        try:
            e, w = int(expert), float(weight)
        except (TypeError, ValueError):
            raise TraceError(f"{where}: expert_skew entry {expert!r}:{weight!r} is not integer:number") from None
        if e < 0 or not w > 0:
            raise TraceError(f"{where}: expert_skew entry {e}:{w} needs expert >= 0 and weight > 0")
        out.append((e, w))
    return tuple(sorted(out))


def _rows(path: Path) -> Iterable[tuple[str, Mapping[str, object]]]:
    with _open_text(path) as f:
        if ".jsonl" in path.suffixes or ".json" in path.suffixes:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield f"{path}:{n}", json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise TraceError(f"{path}:{n}: not JSON: {exc.msg}") from None
        else:
            reader = csv.DictReader(line for line in f if not line.startswith("#"))
            missing = {"timestamp", "prompt_tokens", "output_tokens"} - set(reader.fieldnames or ())
            if missing:
                raise TraceError(f"{path}: CSV header lacks {sorted(missing)}; got {reader.fieldnames}")
            for n, row in enumerate(reader, 2):
                yield f"{path}:{n}", row


def load_trace(path: str | Path) -> Trace:
    """Read a CSV or JSONL trace (optionally .gz), validating every row."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no such trace file")
    times, prompts, outputs, skew_ids = [], [], [], []
    skews: dict[Skew, int] = {(): 0}
    for where, row in _rows(path):
        try:
            t = float(row["timestamp"])
            p = int(row["prompt_tokens"])
            o = int(row["output_tokens"])
        except KeyError as exc:
            raise TraceError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError):
            raise TraceError(f"{where}: timestamp must be a number, prompt_tokens and output_tokens integers") from None
        if not np.isfinite(t) or p < 1 or o < 1:
            raise TraceError(f"{where}: need a finite timestamp and prompt_tokens, output_tokens >= 1")
        skew = _parse_skew(row.get("expert_skew"), where)
        times.append(t)
        prompts.append(p)
        outputs.append(o)
        skew_ids.append(skews.setdefault(skew, len(skews)))
    if not times:
        raise TraceError(f"{path}: no arrivals")
    order = np.argsort(np.asarray(times), kind="stable")
    arrival = np.asarray(times, dtype=float)[order]
    return Trace(
        name=path.name.split(".")[0],
        arrival_s=arrival - arrival[0],
        prompt_tokens=np.asarray(prompts, dtype=np.int64)[order],
        output_tokens=np.asarray(outputs, dtype=np.int64)[order],
        skew_id=np.asarray(skew_ids, dtype=np.int32)[order],
        skews=tuple(skews),
    )


def write_trace(path: str | Path, arrival_s, prompt_tokens, output_tokens, expert_skew=None) -> None:
    """Write a CSV trace (gzip when the name ends in .gz), timestamps in milliseconds precision."""
    path = Path(path)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["timestamp", "prompt_tokens", "output_tokens", "expert_skew"])
    skews = expert_skew if expert_skew is not None else [""] * len(arrival_s)
    for t, p, o, s in zip(arrival_s, prompt_tokens, output_tokens, skews):
        w.writerow([f"{t:.3f}", int(p), int(o), s])
    data = buf.getvalue().encode()
    if path.suffix == ".gz":
        # mtime=0 keeps the file byte-identical from run to run.
        with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            gz.write(data)
    else:
        path.write_bytes(data)
