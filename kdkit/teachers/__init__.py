"""Deprecated: the logit sources moved to `kdkit.sources` (this alias is kept for one release).
`RunPieces` is now `kdkit.sources.SourceContext`."""

import warnings

from kdkit.sources import (
    LOGIT_SOURCES,
    CachedLogits,
    LiveTeacher,
    LogitSource,
    SourceContext,
    TeacherEnsemble,
)

warnings.warn("kdkit.teachers is now kdkit.sources (RunPieces: SourceContext); the old path goes in the next release",
              DeprecationWarning, stacklevel=2)

RunPieces = SourceContext

__all__ = ["LOGIT_SOURCES", "CachedLogits", "LiveTeacher", "LogitSource", "RunPieces", "TeacherEnsemble"]
