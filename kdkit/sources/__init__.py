"""Logit sources: a live teacher, cached logits, a teacher ensemble (same interface)."""

from kdkit.sources.base import LOGIT_SOURCES, CachedLogits, LiveTeacher, LogitSource, SourceContext
from kdkit.sources.ensemble import TeacherEnsemble

__all__ = ["LOGIT_SOURCES", "CachedLogits", "LiveTeacher", "LogitSource", "SourceContext", "TeacherEnsemble"]
