"""Registers the `bd3` model type with lm-eval as soon as lm-eval loads its table of models.

lm-eval 0.4.13 discovers no plugins, so the package installs `bd3_plugin_lm_eval.pth`, which imports this
module at interpreter start. It only adds an import hook: no torch, no lm_eval, nothing until
`lm_eval.models` is imported; then it registers "bd3" as a lazy "module:Class" placeholder.
"""
from __future__ import annotations

import importlib.abc
import sys

_WATCHED = "lm_eval.models"
TARGET = "bd3_plugin.evals.lm_eval_adapter:BD3EvalLM"


def register() -> None:
    from lm_eval.api.registry import model_registry

    if "bd3" not in model_registry.keys():
        model_registry.register("bd3", target=TARGET)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds lm_eval.models through the other finders and runs `register` right after it executes."""

    def find_spec(self, name, path, target=None):
        if name != _WATCHED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                register()
            except Exception as err:  # never break lm-eval itself
                print(f"bd3-plugin: could not register the bd3 model type: {err}", file=sys.stderr)

        loader.exec_module = exec_and_register
        return spec


def install() -> None:
    if _WATCHED in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
