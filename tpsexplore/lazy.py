"""Lazy re-exports for package ``__init__`` modules: a public name is imported from its module on first use,
so `--help` and light imports do not pay for torch, timm or pandas. A leaf module (standard library only)."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, str], extra: tuple[str, ...] = ()
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``exports`` maps a public name to the module
    (absolute, or relative to ``package``) that defines it; ``extra`` are names defined in the package itself."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*exports, *extra})

    return __getattr__, __dir__
