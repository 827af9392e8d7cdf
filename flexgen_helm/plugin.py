"""HELM entry point (`[project.entry-points.helm] flexgen = "flexgen_helm.plugin"`).

`helm-run` reads HELM's own `helm/config/*.yaml`, then the user's `--local-path` folder (default
`./prod_env`), then imports every module of the `helm` entry-point group. Importing this module
registers the packaged `helm_configs/` (see configs.py), so plain `helm-run` knows the
`flexgen/...` deployments with no `--local-path`; a deployment of the same name in
`prod_env/model_deployments.yaml` overrides the packaged one.

It also makes SIGTERM and SIGHUP end `helm-run` as Ctrl-C does, so the engine's offload folder is
removed (runtime/signals.py): HELM builds clients in worker threads, where Python cannot set
signal handlers, and imports this module in the main thread.

And it prints this plugin's errors in helm-run's terminal as one line, without HELM's tracebacks
(helm_errors.py).

Importing this module is cheap: no torch, no model; HELM imports `FlexGenClient` only when a
`flexgen/...` deployment is used.
"""

from flexgen_core.runtime.signals import install_signal_handlers
from flexgen_helm import helm_errors
from flexgen_helm.configs import register_packaged_configs

register_packaged_configs()
install_signal_handlers()
helm_errors.install()
