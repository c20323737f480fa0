"""Old module names kept as aliases: `python -m OLD` runs the new module after a deprecation line."""

from __future__ import annotations

import importlib
import runpy
import sys


def alias(old: str, new: str) -> None:
    """Make module `old` (the caller's __name__) stand for `new`: run it as a script, or become it on import."""
    if old == "__main__":
        print(f"note: this module is deprecated; run `python -m {new}` instead", file=sys.stderr)
        runpy.run_module(new, run_name="__main__", alter_sys=True)
    else:
        sys.modules[old] = importlib.import_module(new)
