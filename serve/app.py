"""The Serve application: `serve run cluster/serve_local.yaml`, or import path `serve.app:app`."""

from __future__ import annotations

from ray.serve import Application

from serve.classifier import Classifier
from serve.settings import AppSettings, parse_settings


def build_app(args: dict | None = None) -> Application:
    """Application builder for Serve configs (`import_path: serve.app:build_app`, `args: {...}`)."""
    settings = parse_settings(AppSettings, args, "application args")
    return Classifier.bind(settings.model_dump())


app = build_app()
