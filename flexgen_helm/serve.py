"""`flexgen-helm serve`: HELM's results website for a suite, on 127.0.0.1 by default.

`helm-server` binds every network interface (0.0.0.0) and has no option to bind fewer; on a shared
machine or a cluster node that publishes the results, and the prompts they show, to the network.
This runs HELM's own web app (helm.benchmark.server's Bottle app and its static pages) on the host
and port given, localhost unless `--host` says otherwise.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _latest(folder: Path) -> tuple[float, str] | None:
    """The most recently summarised suite or release under `folder` (its summary.json's time)."""
    found = [(p.stat().st_mtime, p.parent.name) for p in folder.glob("*/summary.json")] if folder.is_dir() else []
    return max(found) if found else None


def configure(output_path: Path, suite: str | None, release: str | None, cache_output_path: Path):
    """HELM's app, set up to serve `suite` or `release` of `output_path` (default: the latest summarised)."""
    from helm.benchmark.server import app

    if suite and release:
        raise ValueError("give --suite or --release, not both")
    output_path = output_path.resolve()
    if not output_path.is_dir():
        raise ValueError(f"--output-path {str(output_path)!r} is not a folder (HELM's benchmark_output)")
    if not suite and not release:
        runs, releases = _latest(output_path / "runs"), _latest(output_path / "releases")
        if runs is None and releases is None:
            raise ValueError(f"no summarised suite or release under {output_path}: run helm-summarize first")
        if releases is not None and (runs is None or releases > runs):
            release = releases[1]
        else:
            suite = runs[1]
    with resources.as_file(resources.files("helm.benchmark.static_build").joinpath("index.html")) as index:
        static = str(Path(index).parent)
    app.config.update({"helm.staticpath": static, "helm.project": "lite", "helm.outputpath": str(output_path),
                       "helm.cacheoutputpath": str(cache_output_path.resolve()), "helm.outputurl": "benchmark_output",
                       "helm.suite": suite or None, "helm.release": release or None})
    return app, suite or release


def serve(output_path: Path, suite: str | None, release: str | None, host: str, port: int,
          cache_output_path: Path = Path("prod_env/cache/output")) -> None:
    app, what = configure(output_path, suite, release, cache_output_path)
    shown = f"[{host}]" if ":" in host else host
    print(f"Serving {what!r} of {output_path} at http://{shown}:{port}/ (Ctrl-C stops it)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: --host {host} publishes these results to every machine that can reach it", flush=True)
    app.run(host=host, port=port, quiet=True)


__all__ = ["configure", "serve"]
