"""The Serve application: `serve run cluster/serve_local.yaml`, or import path `serve.app:app`."""

from __future__ import annotations

from ray.serve import Application

from serve.classifier import Classifier
from serve.settings import AppSettings, parse_settings


def build_app(args: dict | None = None) -> Application:
    """Application builder for Serve configs (`import_path: serve.app:build_app`, `args: {...}`)."""
    settings = parse_settings(AppSettings, args, "application args")
    learner = None
    if settings.learner is not None:
        from online_learning.learner import OnlineLearner

        learner = OnlineLearner.bind(settings.model_store, settings.learner.model_dump(), settings.tf_threads)
    return Classifier.bind(settings.model_dump(), learner)


app = build_app()
