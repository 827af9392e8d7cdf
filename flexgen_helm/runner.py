"""HELM's MultiGPURunner, able to run `flexgen/...` deployments (SlurmRunner: flexgen_helm/slurm_runner.py).

    HELM_MAX_CONCURRENT_WORKERS=2 helm-run --conf-paths $(flexgen-helm conf flexgen) --suite S \
        --runner-class-name flexgen_helm.runner.MultiGPURunner

HELM's `MultiGPURunner` runs each run spec in a worker process started by `forkserver`; its workers
register HELM's built-in configs and `--local-path`, but never import the entry-point plugins, so
every `flexgen/...` deployment is unknown there and each run fails. This subclass imports them in
each worker before a run spec, as `helm-run` does in its own process. It also reports a failed run's
reason in the parent's log.

Each worker builds its own engine (HELM caches clients per process), with its own offload subfolder.
On GPUs HELM pins a worker to one device (`CUDA_VISIBLE_DEVICES`), and `policy: auto` plans for the
device the worker got. On a CPU-only host the workers share the cores: each engine computes with
`cores // workers` threads, so two workers on a 2-core host do not fight over both cores.
"""

from __future__ import annotations

import os
import traceback

from helm.benchmark.multi_gpu_runner import MultiGPURunner as HelmMultiGPURunner
from helm.benchmark.runner import RunSpec
from helm.common.hierarchical_logger import hlog


class MultiGPURunner(HelmMultiGPURunner):
    def safe_run_one(self, run_spec: RunSpec):
        try:
            _prepare_worker(self.max_concurrent_workers, self.executor.execution_spec.local_path)
        except Exception as error:  # a plugin that cannot load: this run fails, with its reason
            hlog(f"FlexGen: worker {os.getpid()} cannot load HELM's plugins: {error}")
            return error
        error = super().safe_run_one(run_spec)
        if error is not None:
            hlog(f"FlexGen: run {run_spec.name} failed in worker {os.getpid()}: "
                 f"{''.join(traceback.format_exception_only(type(error), error)).strip()}")
        return error


_PREPARED: set[int] = set()  # pids of the worker processes already prepared


def _prepare_worker(workers: int, local_path: str | None) -> None:
    """Once per worker process: HELM's plugins (our deployments), and its share of the CPU."""
    if os.getpid() in _PREPARED:
        return
    from helm.benchmark.config_registry import (
        register_builtin_configs_from_helm_package,
        register_configs_from_directory,
    )
    from helm.benchmark.run import load_entry_point_plugins

    # In helm-run's order: HELM's configs, then --local-path (whose deployments override packaged ones
    # of the same name), then the plugins, which leave registered names alone.
    register_builtin_configs_from_helm_package()
    if local_path is not None:
        register_configs_from_directory(local_path)
    load_entry_point_plugins()
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
    _PREPARED.add(os.getpid())

