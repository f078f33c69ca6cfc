"""Logit sources: a live teacher, cached logits, a teacher ensemble (same interface)."""

from kdkit.teachers.ensemble import TeacherEnsemble
from kdkit.teachers.sources import LOGIT_SOURCES, CachedLogits, LiveTeacher, LogitSource, RunPieces

__all__ = ["LOGIT_SOURCES", "CachedLogits", "LiveTeacher", "LogitSource", "RunPieces", "TeacherEnsemble"]
