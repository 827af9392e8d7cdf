"""flexgen_helm: HELM plugin that serves `flexgen/...` deployments with the FlexGen engine.

`FlexGenClient` (HELM client), `plugin` (the `helm` entry point registering the packaged configs),
`batcher` (gathers concurrent requests into engine batches), `demo` and `cli` (`flexgen-helm demo`).
"""

__all__ = ["FlexGenClient"]


def __getattr__(name: str):
    # The client imports torch and HELM's client stack; keep `import flexgen_helm` light.
    if name == "FlexGenClient":
        from flexgen_helm.client import FlexGenClient

        return FlexGenClient
    raise AttributeError(f"module 'flexgen_helm' has no attribute {name!r}")
