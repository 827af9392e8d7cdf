"""flexgen_core: offloaded, block-scheduled generation (FlexGen, Sheng et al., ICML 2023).

Public API: `Engine`, `Policy`. See README.md.
"""

from flexgen_core.policy import Policy

__all__ = ["Engine", "Policy"]


def __getattr__(name: str):
    # The engine imports torch; keep `import flexgen_core` (and Policy, the planner) torch-free.
    if name == "Engine":
        from flexgen_core.engine import Engine

        return Engine
    raise AttributeError(f"module 'flexgen_core' has no attribute {name!r}")
