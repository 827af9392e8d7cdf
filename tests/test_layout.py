"""The package's layers, as README's code map states them: every import (also the lazy ones inside
functions) goes to the same layer or one above it, so there is no import circle across layers and no
arrow from a lower layer back up to the engine or the CLIs. `flexgen_helm` sits above all of
`flexgen_core`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module's layer is the first prefix that matches its dotted name.
LAYERS = [
    ("contracts", ("flexgen_core.policy", "flexgen_core.compression", "flexgen_core.memory", "flexgen_core.prefix",
                   "flexgen_core.placement")),
    ("models", ("flexgen_core.models",)),
    ("runtime", ("flexgen_core.runtime",)),
    ("plan", ("flexgen_core.plan",)),
    ("engine", ("flexgen_core.engine", "flexgen_core.__init__", "flexgen_core")),
    ("cli", ("flexgen_core.cli", "flexgen_core.bench_cli", "flexgen_core.cli_support")),
    ("testing", ("flexgen_core.testing",)),
    ("helm", ("flexgen_helm",)),
]


def _layer(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "flexgen_core"):
            return index
    if module == "flexgen_core":
        return next(i for i, (name, _) in enumerate(LAYERS) if name == "engine")
    raise AssertionError(f"module {module} has no layer in LAYERS")


def _imports(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            # `from flexgen_core.plan import search` imports the submodule
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in ("flexgen_core", "flexgen_helm")}


def _modules():
    for package in ("flexgen_core", "flexgen_helm"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _known(name: str) -> bool:
    path = ROOT / Path(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_imports_never_go_to_a_lower_layer():
    wrong = []
    for path, module in _modules():
        own = _layer(module)
        for target in _imports(path, module):
            if not _known(target):
                continue  # a name imported from a module, not a module
            if target == "flexgen_core" and module.startswith("flexgen_core"):
                continue  # the package's own __init__ only re-exports Engine and Policy
            if _layer(target) > own:
                wrong.append(f"{module} ({LAYERS[own][0]}) imports {target} ({LAYERS[_layer(target)][0]})")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer():
    for _, module in _modules():
        _layer(module)


def test_every_familys_layers_keep_the_layer_interface():
    """The engine reads layers only through models/base.py's protocols: every layer of every preset's
    family is a Layer, every attention layer an AttentionLayer (qkv, finish, sliding_window)."""
    import json

    from flexgen_core.models.base import AttentionLayer, Layer, LayerKind
    from flexgen_core.models.registry import family_for
    from flexgen_core.testing import PRESETS, build_checkpoint

    seen = set()
    for preset in PRESETS:
        hf = json.loads((build_checkpoint(preset) / "config.json").read_text())
        family = family_for(hf)
        seen.add(family.name)
        for layer in family.build_layers(family.config_from_hf(hf)):
            assert isinstance(layer, Layer), (preset, layer)
            if layer.kind is LayerKind.ATTENTION:
                assert isinstance(layer, AttentionLayer), (preset, layer)
            else:
                assert callable(getattr(layer, "forward", None)), (preset, layer)
    assert seen == {"opt", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral",
                    "qwen2_moe", "qwen3_moe", "olmoe"}
