"""The systems under test: this Serve app in chosen variants, each in its own process."""

from __future__ import annotations

from dataclasses import dataclass

from serve.process import RunningServe, local_config


@dataclass(frozen=True)
class ServeVariant:
    name: str
    fast_ingress: bool = True
    replicas: int = 1
    max_batch_size: int = 32
    batch_wait_timeout_s: float | None = None  # None: the config's


def variant_config(variant: ServeVariant, store: str, port: int) -> dict:
    """The local Serve config with the variant's replica count, batching and port."""
    config = local_config(store, port)
    dep = config["applications"][0]["deployments"][0]
    dep.pop("autoscaling_config", None)  # fixed replica counts make steps comparable
    dep["num_replicas"] = variant.replicas
    dep["user_config"]["max_batch_size"] = variant.max_batch_size
    if variant.batch_wait_timeout_s is not None:
        dep["user_config"]["batch_wait_timeout_s"] = variant.batch_wait_timeout_s
    return config


def start_variant(variant: ServeVariant, store: str, port: int = 8000) -> RunningServe:
    return RunningServe(variant_config(variant, store, port), variant.fast_ingress, name=variant.name)
