"""`flexgen-helm compare`: a suite's HELM results beside a reference's, run entry by run entry.

The reference is any HELM `benchmark_output` layout, a local folder or a URL prefix (HELM's published
raw results: `https://storage.googleapis.com/crfm-helm-public/<project>/benchmark_output`, read over
HTTP and cached under ~/.cache/flexgen-helm/compare/):
- a suite: `runs/<suite>/<run>/stats.json` (listed from the folder, or from `runs/<suite>/run_specs.json`,
  which helm-summarize writes, over HTTP);
- a release: `releases/<release>/runs_to_run_suites.json` (run name -> suite), its runs under
  `runs/<suite>/` as above.

Runs are matched by their run entry without the model (`mmlu:subject=...,method=...`) and by model:
ours, or the one `--model-map OURS=REF` names (e.g. the paper's OPT-IML-30B against HELM Classic's
OPT-175B rows). Where the models differ the table says so: the difference is then the model's, not
the client's. Metrics: each run's main one, as HELM's schema names it for the run's group
(`--all-metrics`: every non-timing metric both have),
unperturbed, on the test split (valid where there is no test). Metrics computed from what a client
reports of its generated tokens (logprob, perplexity, bits_per_byte, max_prob, finish_reason_*) are
marked: HELM's own client reports logprob 0 for greedy output and no finish reason, ours the model's
log-softmax and the real reason, so they differ between those two by design.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

DEFAULT_METRIC = "exact_match"  # for a run whose groups HELM's schema does not list


@functools.lru_cache(maxsize=1)
def _schema_main_metrics() -> dict[str, str]:
    from helm.benchmark.presentation.schema import get_default_schema_path, read_schema

    schema = read_schema(get_default_schema_path())
    return {group.name: group.environment["main_name"] for group in schema.run_groups
            if group.environment and "main_name" in group.environment}


def main_metric(scenario: str, groups: Sequence[str] = ()) -> str:
    """A run's main metric as HELM's own schema (schema_classic.yaml) names it for its run group: the
    group named as the run's scenario (`synthetic_reasoning_natural`), else the first of `groups` (its
    run_spec.json's, e.g. `summarization_xsum` for `summarization_xsum_sampled`) that the schema has."""
    table = _schema_main_metrics()
    return next((table[group] for group in (scenario, *groups) if group in table), DEFAULT_METRIC)
# Wall-clock and batch-shape stats differ between any two runs, whatever the client.
TIMING_STATS = {"inference_runtime", "inference_denoised_runtime", "batch_size", "training_co2_cost",
                "training_energy_cost", "inference_idealized_runtime"}
CACHE_DIR = Path(os.path.expanduser("~/.cache/flexgen-helm/compare"))
# Stats computed from what a client reports about its generated tokens, not from the text: HELM's own
# HuggingFaceClient reports logprob 0 for greedy output (it samples at temperature 1e-7 and returns
# that distribution's logprobs) and an unknown finish reason; FlexGenClient the model's log-softmax and
# the real reason. These differ between the two clients by design, whatever the texts.
CLIENT_REPORTED = {"logprob", "logprob_per_byte", "bits_per_byte", "perplexity", "max_prob"}


def client_reported(metric: str) -> bool:
    return metric in CLIENT_REPORTED or metric.startswith("finish_reason_")


@dataclass(frozen=True)
class Run:
    name: str                               # HELM's run name
    entry: str                              # without model= and model_deployment=
    model: str                              # as in run names ("/" written "_")
    stats: dict[str, tuple[float, int]]     # metric -> (mean, count), unperturbed, test split
    groups: tuple[str, ...] = ()            # HELM's run groups (run_spec.json), where it has them

    @property
    def instances(self) -> int | None:
        """Instances evaluated (HELM's num_instances), not its count of train trials."""
        stat = self.stats.get("num_instances")
        return round(stat[0]) if stat else None


@dataclass(frozen=True)
class Row:
    entry: str
    model: str
    reference_model: str | None
    metric: str
    ours: float | None
    reference: float | None
    ours_count: int
    reference_count: int
    ours_instances: int | None = None
    reference_instances: int | None = None

    @property
    def difference(self) -> float | None:
        return None if self.ours is None or self.reference is None else self.ours - self.reference

    @property
    def same_model(self) -> bool:
        return self.reference_model == self.model


def split_run_name(name: str) -> tuple[str, str]:
    """(run entry without the model arguments, model)."""
    parts = name.split(",")
    model = next((p.split("=", 1)[1] for p in parts if p.startswith("model=")), "")
    entry = ",".join(p for p in parts if not p.startswith(("model=", "model_deployment=")))
    return entry, model


# The largest JSON file read: HELM's stats.json and indexes are kilobytes to a few megabytes.
MAX_JSON_BYTES = 256 * 2**20


def check_name(name: Any, what: str, where: str) -> str:
    """A suite, release or run name used as one path component: no separator, no `..`."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"{where}: {what} {name!r} is not a plain name (it would leave the reference's folder)")
    return name


class Source:
    """A `benchmark_output` folder or URL prefix; reads JSON files (at most MAX_JSON_BYTES each), over
    HTTP through a cache that keeps only bodies that parsed."""

    def __init__(self, root: str, cache_dir: Path = CACHE_DIR, max_bytes: int = MAX_JSON_BYTES) -> None:
        self.root = root.rstrip("/")
        self.remote = root.startswith(("http://", "https://"))
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        if not self.remote and not Path(root).is_dir():
            raise ValueError(f"{root!r} is not a folder (a HELM benchmark_output) nor an http(s) URL")

    def json(self, relative: str) -> Any:
        if not self.remote:
            path = Path(self.root) / relative
            if not path.is_file():
                raise FileNotFoundError(f"no {relative} under {self.root}")
            if path.stat().st_size > self.max_bytes:
                raise ValueError(f"{path} is {path.stat().st_size / 2**20:.0f} MiB, more than the "
                                 f"{self.max_bytes / 2**20:.0f} MiB a HELM results file may hold")
            return self._parse(path.read_bytes(), str(path))
        url = f"{self.root}/{relative}"
        cached = self.cache_dir / hashlib.sha256(url.encode()).hexdigest()
        if cached.is_file():
            return self._parse(cached.read_bytes(), f"{url} (cached as {cached})")
        data = self._download(url)
        value = self._parse(data, url)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.cache_dir, prefix=".partial-", delete=False) as out:
            out.write(data)
        os.replace(out.name, cached)  # whole or not at all, and only a body that parsed
        return value

    def _download(self, url: str) -> bytes:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                data = response.read(self.max_bytes + 1)
        except OSError as error:
            raise FileNotFoundError(f"cannot read {url}: {error}") from None
        if len(data) > self.max_bytes:
            raise ValueError(f"{url} is more than the {self.max_bytes / 2**20:.0f} MiB a HELM results file may hold")
        return data

    @staticmethod
    def _parse(data: bytes, where: str) -> Any:
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            start = data[:60].decode("utf-8", "replace").split("\n")[0]
            raise ValueError(f"{where} is not JSON ({error}; it starts {start!r})") from None

    def suite_runs(self, suite: str) -> list[str]:
        check_name(suite, "suite", self.root)
        if not self.remote:
            folder = Path(self.root) / "runs" / suite
            if not folder.is_dir():
                raise ValueError(f"no suite {suite!r} under {self.root} (no runs/{suite}/)")
            return sorted(p.parent.name for p in folder.glob("*/stats.json"))
        where = f"{self.root}/runs/{suite}/run_specs.json"
        specs = self.json(f"runs/{suite}/run_specs.json")
        try:
            names = [spec["name"] for spec in specs]
        except (TypeError, KeyError):
            raise ValueError(f"{where} is not a list of run specs with names") from None
        return sorted(check_name(name, "run", where) for name in names)


def _main_stats(stats: Iterable[dict]) -> dict[str, tuple[float, int]]:
    """Unperturbed metric means, test split preferred (valid otherwise)."""
    by_split: dict[str, dict[str, tuple[float, int]]] = {}
    for stat in stats:
        name = stat["name"]
        if name.get("perturbation") or not stat.get("count") or name["name"] in TIMING_STATS:
            continue
        by_split.setdefault(name.get("split") or "", {})[name["name"]] = (stat["mean"], stat["count"])
    merged: dict[str, tuple[float, int]] = {}
    for split in ("", "valid", "test"):  # later splits win
        merged.update(by_split.get(split, {}))
    return merged


def read_runs(source: Source, suite: str | None = None, release: str | None = None) -> list[Run]:
    if (suite is None) == (release is None):
        raise ValueError("name a suite or a release, not both")
    if release is not None:
        check_name(release, "release", source.root)
        where = f"{source.root}/releases/{release}/runs_to_run_suites.json"
        suites = source.json(f"releases/{release}/runs_to_run_suites.json")
        if not isinstance(suites, dict):
            raise ValueError(f"{where} is not an object of run names to suites")
        names = sorted((check_name(name, "run", where), check_name(run_suite, "suite", where))
                       for name, run_suite in suites.items())
    else:
        names = [(name, suite) for name in source.suite_runs(suite)]
    runs = []
    for name, run_suite in names:
        try:
            stats = source.json(f"runs/{run_suite}/{name}/stats.json")
        except FileNotFoundError:
            continue  # listed but not computed (a failed run)
        entry, model = split_run_name(name)
        try:
            spec = source.json(f"runs/{run_suite}/{name}/run_spec.json")
            groups = tuple(g for g in spec.get("groups", ()) if isinstance(g, str)) if isinstance(spec, dict) else ()
        except FileNotFoundError:
            groups = ()
        try:
            main = _main_stats(stats)
        except (TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"{source.root}/runs/{run_suite}/{name}/stats.json is not a list of HELM stats "
                             f"({type(error).__name__}: {error})") from None
        runs.append(Run(name, entry, model, main, groups))
    return runs


def _model_key(model: str) -> str:
    return model.replace("/", "_")


def compare(ours: Sequence[Run], reference: Sequence[Run], model_map: dict[str, str] | None = None,
            all_metrics: bool = False) -> list[Row]:
    """A row per (run entry of ours, metric); the reference run: same entry, our model or its mapping."""
    mapping = {_model_key(k): _model_key(v) for k, v in (model_map or {}).items()}
    by_key = {(run.entry, run.model): run for run in reference}
    rows = []
    for run in ours:
        wanted = mapping.get(run.model, run.model)
        ref = by_key.get((run.entry, wanted))
        if all_metrics:
            metrics = sorted(set(run.stats) & set(ref.stats)) if ref else sorted(run.stats)
        else:
            metrics = [main_metric(run.entry.split(":")[0], run.groups)]
        for metric in metrics:
            mine = run.stats.get(metric)
            theirs = ref.stats.get(metric) if ref else None
            rows.append(Row(run.entry, run.model, ref.model if ref else None, metric,
                            mine[0] if mine else None, theirs[0] if theirs else None,
                            mine[1] if mine else 0, theirs[1] if theirs else 0,
                            run.instances, ref.instances if ref else None))
    return rows


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


HEADER = ("run entry", "metric", "ours", "reference", "difference", "instances (ours/ref)", "models")


def _cells(row: Row) -> tuple[str, ...]:
    if row.reference_model is None:
        models = f"{row.model}; no reference run"
    elif row.same_model:
        models = row.model + ("; reported by each client (see the note)" if client_reported(row.metric) else "")
    else:
        models = f"{row.model} vs {row.reference_model}: different models, the difference is the model's"
    diff = row.difference
    return (row.entry, row.metric, _cell(row.ours), _cell(row.reference),
            "n/a" if diff is None else f"{diff:+.4f}", f"{_count(row.ours_instances)}/{_count(row.reference_instances)}",
            models)


def _count(instances: int | None) -> str:
    return "n/a" if instances is None else str(instances)


CLIENT_NOTE = ("Note: metrics marked \"reported by each client\" are computed from what a client reports of "
               "its generated tokens (logprobs, finish reasons), not from the text. HELM's own "
               "HuggingFaceClient reports logprob 0 for greedy output (it samples at temperature 1e-7) and no "
               "finish reason; FlexGenClient reports the model's log-softmax and the real reason. They differ "
               "between those two clients by design, whatever the texts.")


def notes(rows: Sequence[Row]) -> list[str]:
    """The notes the table's rows refer to."""
    return [CLIENT_NOTE] if any(r.same_model and client_reported(r.metric) for r in rows) else []


def format_table(rows: Sequence[Row]) -> str:
    lines = [HEADER] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_markdown(rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + " --- |" * len(HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["run_entry", "metric", "ours", "reference", "difference", "ours_instances",
                     "reference_instances", "ours_count", "reference_count", "model", "reference_model"])
    for r in rows:
        writer.writerow([r.entry, r.metric, r.ours, r.reference, r.difference, r.ours_instances,
                         r.reference_instances, r.ours_count, r.reference_count, r.model, r.reference_model])
    return buffer.getvalue()


def plot(rows: Sequence[Row], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ours is not None or r.reference is not None]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.5))
    y = list(range(len(shown)))[::-1]
    ax.barh([v + 0.2 for v in y], [r.ours or 0 for r in shown], height=0.4, label="ours")
    ax.barh([v - 0.2 for v in y], [r.reference or 0 for r in shown], height=0.4, label="reference", color="0.6")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r.entry} ({r.metric})" for r in shown], fontsize=7)
    ax.legend(fontsize=8)
    ax.set_title("HELM results: ours beside the reference", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
