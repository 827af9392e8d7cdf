"""Entry point of `flexgen_helm.runner.SlurmRunner`'s worker jobs: HELM's own worker entry point
(`helm.benchmark.slurm_runner`), after HELM's plugins are loaded. HELM's worker registers its
built-in configs and `--local-path`, never the plugins, so `flexgen/...` deployments would be unknown.
Here HELM's configs come first, then the plugins, then (in HELM's entry point) `--local-path`, whose
deployments replace packaged ones of the same name: the precedence of helm-run."""

from helm.benchmark.config_registry import register_builtin_configs_from_helm_package
from helm.benchmark.run import load_entry_point_plugins
from helm.benchmark.slurm_runner import main

if __name__ == "__main__":
    register_builtin_configs_from_helm_package()
    load_entry_point_plugins()
    main()
