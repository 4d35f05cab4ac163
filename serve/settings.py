"""Settings of the Serve application: validated once, in one place, unknown keys rejected.

Ray Serve's own YAML (cluster/serve_*.yaml) is the deployment config; these are the two parts of
it that belong to this application: the application `args` and the Classifier's `user_config`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from online_learning.settings import LearnerSettings

# The fast ingress: throughput-optimised Serve with the HAProxy proxy, where Serve's defaults
# collapse at hundreds of clients (docs/SERVING.md, Measured here). These must be in the
# environment of the process that starts Ray (serve run, ray start), not in a runtime_env.
FAST_INGRESS_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AppSettings(_Strict):
    """`args:` of the application in the Serve config."""

    model_store: str | None = Field(None, description="model store URI; default $TEXTSERVE_MODEL_STORE or ./artifacts/models")
    max_body_bytes: int = Field(64 * 1024, ge=64, description="larger bodies get 413")
    max_text_chars: int = Field(2000, ge=1, description="longer texts get 413 (the model reads 32 tokens anyway)")
    max_texts: int = Field(64, ge=1, description="most texts in one request")
    top_k: int = Field(3, ge=1, description="ranked labels returned when the request does not say")
    tf_threads: int = Field(1, ge=1, le=64, description="TensorFlow threads per replica: replicas must not fight over cores")
    operator_token_env: str = Field("TEXTSERVE_FEEDBACK_TOKEN",
                                    description="env var of the bearer token that shows operator details in /v1/model")
    model_poll_s: float = Field(2.0, gt=0, description="how often a replica with no model looks in the store")
    learner: LearnerSettings | None = Field(default_factory=LearnerSettings,
                                            description="online learning; null turns it (and /v1/feedback) off")

    @field_validator("model_store")
    @classmethod
    def _absolute(cls, uri: str | None) -> str | None:
        # Resolved where the config is read (serve run's cwd), not in each replica's own cwd.
        from train.store import default_store_uri

        uri = uri or default_store_uri()
        return uri if "://" in uri else str(Path(uri).resolve())


class BatchSettings(_Strict):
    """`user_config:` of the Classifier; changes live through `reconfigure`, no restart.

    The one home of the batching defaults: the batcher (serve/batcher.py) starts from them, and the
    Serve configs in cluster/ and the benchmarks name the same values."""

    # 32: a batch the large model runs in a few ms on one core, so a full batch still answers far
    # under the 1 s goal, while 400 waiting clients drain in a dozen model calls.
    max_batch_size: int = Field(32, ge=1, le=1024, description="most texts per model call")
    # Waited only while the replica is busy (its previous batch held more than one text): an idle
    # replica sends a lone text to the model at once, so quiet hours pay nothing, and under load
    # 2 ms (well below one model call) lets arrivals fill the next batch (docs/SERVING.md).
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="longest wait for a batch to fill, "
                                        "applied only while the replica is busy")


def parse_settings(cls: type[_Strict], data: dict | None, where: str):
    """Validate `data` as `cls`; errors name the key, what was wrong and the keys allowed."""
    data = dict(data or {})
    try:
        return cls(**data)
    except ValidationError as err:
        allowed = ", ".join(cls.model_fields)
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: "
            + ("unknown key (typo?)" if e["type"] == "extra_forbidden" else e["msg"])
            for e in err.errors()
        )
        raise ValueError(f"{where}: {problems}. Allowed keys: {allowed}") from None
