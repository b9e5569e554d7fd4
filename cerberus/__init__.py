"""Cerberus: design, train and evaluate CIFAR-10 ResNets under a hard parameter budget.

``import cerberus`` is cheap: torch is imported only when a name that needs it is used.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Architecture": "cerberus.arch",
    "count_params": "cerberus.arch",
    "count_macs": "cerberus.arch",
    "ExperimentConfig": "cerberus.config",
    "load_config": "cerberus.config",
    "build_model": "cerberus.model",
    "CerberusError": "cerberus.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cerberus' has no attribute {name!r}")
