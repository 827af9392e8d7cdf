"""The packaged HELM configs (`flexgen_helm/helm_configs/`): reading them and registering them.

`register_packaged_configs` registers the model metadata, tokenizer configs and model deployments
that are not registered yet, so a user's `prod_env/` entry of the same name wins (HELM reads
prod_env/ before it imports the entry-point plugins). A leading `~` in path arguments is expanded
here, because HELM's YAML loader does not. Importing this module registers nothing (see plugin.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import cattrs
import dacite
import yaml

logger = logging.getLogger(__name__)

MODEL_METADATA_FILE = "model_metadata.yaml"
TOKENIZER_CONFIGS_FILE = "tokenizer_configs.yaml"
MODEL_DEPLOYMENTS_FILE = "model_deployments.yaml"

# Client and tokenizer arguments that hold local paths.
_PATH_ARGS = ("pretrained_model_name_or_path", "offload_dir")

DEMO_DEPLOYMENT = "flexgen/opt-demo"


def config_dir() -> Path:
    """The packaged `helm_configs/` folder."""
    return Path(__file__).resolve().parent / "helm_configs"


def _expand_path_args(args: dict[str, Any] | None) -> dict[str, Any] | None:
    if not args:
        return args
    expanded = dict(args)
    for name in _PATH_ARGS:
        value = expanded.get(name)
        if isinstance(value, str) and value.startswith("~"):
            expanded[name] = os.path.expanduser(value)
    return expanded


def load_config(file_name: str) -> dict[str, Any]:
    """One packaged YAML file, with `~` expanded in path arguments."""
    with open(config_dir() / file_name, encoding="utf-8") as handle:
        raw = yaml.safe_load(handle)
    for deployment in raw.get("model_deployments", []):
        deployment["client_spec"]["args"] = _expand_path_args(deployment["client_spec"].get("args"))
    for tokenizer in raw.get("tokenizer_configs", []):
        tokenizer["tokenizer_spec"]["args"] = _expand_path_args(tokenizer["tokenizer_spec"].get("args"))
    return raw


def packaged_deployment(name: str) -> dict[str, Any]:
    """The raw packaged deployment `name` (paths expanded); `ValueError` listing the names otherwise."""
    deployments = load_config(MODEL_DEPLOYMENTS_FILE)["model_deployments"]
    for deployment in deployments:
        if deployment["name"] == name:
            return deployment
    raise ValueError(f"no packaged deployment {name!r}; packaged: {[d['name'] for d in deployments]}")


def _placeholder(model) -> bool:
    """HELM's stand-in metadata for a model it had none for (model_metadata_registry's unknown model)."""
    return model.creator_organization_name == "Unknown" and model.display_name == model.description == model.name


def register_packaged_configs() -> None:
    """Register the packaged metadata, tokenizers and deployments that are not registered yet.

    Order matters: HELM's `register_model_deployment` looks up the model's metadata and invents a
    placeholder if it is missing, so metadata goes first.
    """
    from helm.benchmark import model_deployment_registry as deployments
    from helm.benchmark import model_metadata_registry as metadata
    from helm.benchmark import tokenizer_config_registry as tokenizers

    # dacite, as HELM does for this file: cattrs has no default structuring for dates.
    raw_models = load_config(MODEL_METADATA_FILE)
    for model in dacite.from_dict(metadata.ModelMetadataList, raw_models).models:
        known = metadata.MODEL_NAME_TO_MODEL_METADATA.get(model.name)
        if known is None:
            metadata.register_model_metadata(model)
        elif _placeholder(known):
            # A prod_env deployment named this model before the plugin loaded: HELM warned "Could not find
            # model metadata" and registered a placeholder (its tags guessed). Ours replaces it, keeping the
            # deployments HELM attached to it.
            model.deployment_names = sorted(set(model.deployment_names or []) | set(known.deployment_names or []))
            metadata.register_model_metadata(model)
            metadata.ALL_MODELS_METADATA[:] = [m for m in metadata.ALL_MODELS_METADATA if m is not known]

    raw_tokenizers = load_config(TOKENIZER_CONFIGS_FILE)
    for tokenizer in cattrs.structure(raw_tokenizers, tokenizers.TokenizerConfigs).tokenizer_configs:
        if tokenizer.name not in tokenizers.TOKENIZER_NAME_TO_CONFIG:
            tokenizers.register_tokenizer_config(tokenizer)

    raw_deployments = load_config(MODEL_DEPLOYMENTS_FILE)
    for deployment in cattrs.structure(raw_deployments, deployments.ModelDeployments).model_deployments:
        if deployment.name in deployments.DEPLOYMENT_NAME_TO_MODEL_DEPLOYMENT:
            logger.info("Deployment %s is already registered (prod_env?); keeping that one", deployment.name)
            continue
        deployments.register_model_deployment(deployment)

