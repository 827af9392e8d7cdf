"""HELM's SlurmRunner, able to run `flexgen/...` deployments (needs `pip install -e .[slurm]`).

    helm-run ... --runner-class-name flexgen_helm.slurm_runner.SlurmRunner --local-path prod_env

HELM's `SlurmRunner` submits one Slurm job per run spec (its `sbatch` arguments from
`prod_env/runner_config.yaml`, `slurm_args`), each running HELM's worker entry point, which registers
HELM's configs and `--local-path` but never loads the plugins, so `flexgen/...` deployments are unknown
there. This subclass's jobs run this module instead: HELM's configs, then the plugins, then HELM's
worker entry point (which registers `--local-path`, whose deployments replace packaged ones of the same
name: helm-run's precedence). Each job builds its own engine with its own offload subfolder; jobs on
one node share HELM's sqlite cache files in `prod_env/cache/`.

A module of its own: HELM's slurm module imports `simple_slurm`, which only the slurm extra installs.
"""

from __future__ import annotations

from helm.benchmark import slurm_runner as helm_slurm_runner
from helm.benchmark.runner import RunSpec
from helm.benchmark.slurm_runner import SlurmRunner as HelmSlurmRunner

_HELM_WORKER = f" -m {helm_slurm_runner.__name__} "
_OUR_WORKER = f" -m {__name__} "


class SlurmRunner(HelmSlurmRunner):
    def _submit_slurm_job_for_run_spec(self, run_spec: RunSpec) -> int:
        """HELM's submission, with the job's command pointed at this module. HELM builds the command
        inside this method and hands it to its module's `submit_slurm_job`; that one name is replaced
        for the call (the manager submits from one thread) and restored after."""
        submit = helm_slurm_runner.submit_slurm_job

        def submit_ours(command: str, slurm_args):
            if _HELM_WORKER not in command:
                raise RuntimeError(f"unexpected worker command from HELM's SlurmRunner: {command}")
            return submit(command.replace(_HELM_WORKER, _OUR_WORKER), slurm_args)

        helm_slurm_runner.submit_slurm_job = submit_ours
        try:
            return super()._submit_slurm_job_for_run_spec(run_spec)
        finally:
            helm_slurm_runner.submit_slurm_job = submit


def worker_main() -> None:
    """A worker job: HELM's configs, the plugins, then HELM's worker entry point."""
    from helm.benchmark.config_registry import register_builtin_configs_from_helm_package
    from helm.benchmark.run import load_entry_point_plugins

    register_builtin_configs_from_helm_package()
    load_entry_point_plugins()
    helm_slurm_runner.main()


if __name__ == "__main__":
    worker_main()
