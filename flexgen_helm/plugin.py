"""HELM entry point (`[project.entry-points.helm] flexgen = "flexgen_helm.plugin"`).

`helm-run` reads HELM's own `helm/config/*.yaml`, then the user's `--local-path` folder (default
`./prod_env`), then imports every module of the `helm` entry-point group. Importing this module
registers the packaged `helm_configs/` (see configs.py), so plain `helm-run` knows the
`flexgen/...` deployments with no `--local-path`; a deployment of the same name in
`prod_env/model_deployments.yaml` overrides the packaged one.

Importing this module is cheap: no torch, no model; HELM imports `FlexGenClient` only when a
`flexgen/...` deployment is used.
"""

from flexgen_helm.configs import register_packaged_configs

register_packaged_configs()
