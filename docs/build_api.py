"""Build kdkit's API reference (HTML, searchable) from its docstrings with pdoc.

    pip install -e ".[docs]"
    python docs/build_api.py            # writes docs/api/; open docs/api/kdkit.html
    python docs/build_api.py OUT_DIR

The pages are generated, never written by hand: a docstring is the one place a name is documented.
"""

from __future__ import annotations

import sys
from pathlib import Path

# the public modules: the package's table of contents (kdkit.__all__) and the modules it draws from
MODULES = ["kdkit", "kdkit.api", "kdkit.config", "kdkit.types", "kdkit.registry", "kdkit.plugins", "kdkit.data",
           "kdkit.models", "kdkit.losses", "kdkit.sources", "kdkit.engine", "kdkit.analysis"]


def build(out: str | Path, modules: list[str] = MODULES) -> Path:
    """Render `modules` into `out`; returns the path of the package's page (OUT/kdkit.html)."""
    import pdoc
    import pdoc.render

    import kdkit

    pdoc.render.configure(docformat="markdown", footer_text=f"kdkit {kdkit.__version__}", search=True)
    pdoc.pdoc(*modules, output_directory=Path(out))
    return Path(out) / "kdkit.html"


if __name__ == "__main__":
    root = Path(__file__).resolve().parent
    sys.path.insert(0, str(root.parent))  # this checkout's kdkit, installed or not
    page = build(sys.argv[1] if len(sys.argv) > 1 else root / "api")
    print(f"API reference: {page}")
