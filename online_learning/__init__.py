"""Feedback events -> durable log -> online updates -> gated delta publishes to the replicas."""

from online_learning.feedback_log import FeedbackEvent, FeedbackLog, LoggedEvent
from online_learning.settings import LearnerSettings

__all__ = ["FeedbackEvent", "FeedbackLog", "LoggedEvent", "LearnerSettings"]
