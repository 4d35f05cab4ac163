"""Settings of online learning: the `learner:` block of the application args in the Serve config."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class LearnerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: str = Field("artifacts/online", description="feedback log + learner state; shared storage on a cluster")
    publish_interval_s: float = Field(1.0, gt=0, description="the learner publishes at most this often")
    max_staleness_s: float = Field(10.0, gt=0, description="an acknowledged event is served by every replica within this")
    replica_poll_s: float = Field(0.25, gt=0, description="how often a replica asks the learner for a newer version")
    learning_rate: float = Field(3e-3, gt=0, description="Adam rate of the embedding rows (new words and languages)")
    dense_learning_rate: float = Field(3e-4, gt=0, description="Adam rate of the dense weights (LSTM or convolutions, "
                                       "output layer), shared with everything the base knows: lower, against forgetting")
    batch_size: int = Field(32, ge=1)
    replay_events: int = Field(128, ge=0, description="earlier feedback re-trained with each round, at least")
    replay_ratio: int = Field(2, ge=0, description="...or this many times the round's new events, if more")
    followup_rounds: int = Field(24, ge=0, description="replay-only rounds after new events, at most: a burst is "
                                 "learned, not skimmed")
    followup_min_rounds: int = Field(6, ge=0, description="...at least (after a single event too; never more than "
                                     "followup_rounds: 0 rounds there means none)")
    followup_passes: float = Field(9.0, ge=0, description="...and in between, enough for each event learned to be "
                                   "replayed this many times (docs/ONLINE_LEARNING.md)")
    followup_replay_events: int = Field(512, ge=1, description="earlier feedback re-trained in each follow-up round")
    base_replay_events: int = Field(32, ge=0, description="base training examples per round, at least, against forgetting")
    base_replay_ratio: float = Field(3.0, ge=0, description="...or this many per feedback example the round trains "
                                     "(new and replayed), if more: the rehearsal ratio")
    base_repair_rounds: int = Field(4, ge=0, description="base rehearsal passes for a candidate that failed only the base check")
    base_repair_examples: int = Field(512, ge=1, description="base examples per rehearsal pass")
    holdout_percent: int = Field(10, ge=0, le=50, description="share of feedback kept out of training, for the gate")
    holdout_base_examples: int = Field(1000, ge=0, description="base validation examples in the gate's holdout (the bundled English validation split is 658: all of it)")
    gate_margin: float = Field(0.05, ge=0, le=1,
                               description="hold back a candidate this much below the served feedback-holdout accuracy")
    gate_min_losses: int = Field(3, ge=1, description="...and only when it answers at least this many more held-out "
                                 "feedback events wrong (a holdout of a few events is noise, not evidence)")
    max_base_drop: float = Field(0.01, ge=0, le=1, description="hold back a candidate whose base-holdout accuracy is "
                                 "this much below the lineage's anchor (the base it started from)")
    max_contradiction_share: float = Field(0.2, ge=0, le=1, description="refuse new events, untrained and marked "
                                           "rejected, while this share of the recent stream gives another label than a "
                                           "confident served answer (relabelling attacks; 1 turns the check off)")
    contradiction_confidence: float = Field(0.9, ge=0, le=1, description="a served answer at least this sure counts "
                                            "for the contradiction check")
    contradiction_window: int = Field(512, ge=1, description="recent new events the contradiction share is taken over")
    contradiction_min_events: int = Field(32, ge=1, description="a round this big is judged on its own share; a smaller "
                                          "one with the recent stream, once that holds this many (a single correction "
                                          "of a confident mistake in clean traffic is judged by the gate as usual)")
    nice: int = Field(10, ge=0, le=19, description="OS priority (Linux nice) of the learner's training threads (not of "
                      "the event loop answering feedback and replicas): on a machine shared with replicas, training "
                      "yields the CPU to serving; 0 keeps normal priority")
    train_duty_cycle: float = Field(1.0, gt=0, le=1, description="share of the time the learner's training may take: "
                                    "after a round of t seconds it rests t * (1 - d) / d (on a machine shared with "
                                    "replicas, below 1 leaves them CPU while a stream trains, at the cost of freshness)")
    max_round_events: int = Field(512, ge=1, description="new events trained in one round (read from the log): a "
                                  "bigger round moves the base further than its rehearsal can hold (docs/DRIFT.md)")
    staleness_hard_limit_s: float | None = Field(
        120.0, gt=0, description="a replica that reaches the learner but stays behind this long fails its health "
        "check so Serve replaces it (null: never)")
    startup_sync_timeout_s: float = Field(60.0, gt=0, description="a new replica waits this long for the learner's "
                                          "current weights before it takes traffic on the store's version")
    retain_deltas: int = Field(50, ge=1, description="deltas kept for replicas that are a few versions behind")
    snapshot_interval_s: float = Field(60.0, gt=0, description="full snapshot into the model store at most this often")
    store_keep_last: int = Field(5, ge=1, description="model store versions kept after each snapshot (plus the "
                                 "lineage's base): older ones are deleted")
    log_segment_events: int = Field(50_000, ge=1, description="events per feedback log segment file")
    log_retain_events: int = Field(100_000, ge=0, description="events kept below the newest snapshot's offset when "
                                   "the log is compacted (a fine-tune reads them)")
    feedback_token_env: str = Field("TEXTSERVE_FEEDBACK_TOKEN", description="env var holding the feedback bearer token")
    max_events: int = Field(256, ge=1, description="most events in one /v1/feedback request")
    rate_limit_per_s: float = Field(200.0, gt=0, description="feedback requests per second per client, app-wide")
    rate_burst: int = Field(400, ge=1, description="feedback requests a client may send at once")
    auth_fail_rate_per_s: float = Field(0.2, gt=0, description="failed authentications per second per client")
    auth_fail_burst: int = Field(10, ge=1, description="failed authentications at once, then 429")
    rate_limit_clients: int = Field(10_000, ge=1, description="clients remembered; the least recent is forgotten")

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, path: str) -> str:
        return str(Path(path).resolve())  # resolved where the config is read, not per replica

    @model_validator(mode="after")
    def _window_holds_a_verdict(self):
        if self.contradiction_window < self.contradiction_min_events:
            raise ValueError(f"contradiction_window ({self.contradiction_window}) must be at least "
                             f"contradiction_min_events ({self.contradiction_min_events}): a trickle could never be judged")
        return self

    @model_validator(mode="after")
    def _staleness_reachable(self):
        floor = self.publish_interval_s + self.replica_poll_s
        if self.max_staleness_s <= floor:
            raise ValueError(f"max_staleness_s ({self.max_staleness_s}) must exceed publish_interval_s + "
                             f"replica_poll_s ({floor}): a bound below one publish round cannot hold")
        return self
