"""Plainly valid CLI values converted without pydantic, so a one-shot query does not pay for it.

Typer (0.2x) coerces every parameter through a pydantic TypeAdapter: importing pydantic and building an
adapter per option costs ~0.15-0.25 s of a query that should take under a second. Our commands use plain
types (str, int, float, bool, Path, lists of them, int/float ranges). For those, a value that is plainly valid
is converted here; anything else (a value out of range or unparseable, another type, a custom parser) goes to
Typer's own coercion, so error messages stay exactly Typer's. Installed by `cli.app.main` only; with a
Typer whose internals differ (older ones do not use pydantic at all) `install` changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_NO = object()  # "not plainly valid": let Typer decide


def _number(value: Any, kind: type, info: Any) -> Any:
    if isinstance(value, str):
        if not (_INT if kind is int else _FLOAT).fullmatch(value):
            return _NO
        value = kind(value)
    elif isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
        return _NO
    else:
        value = kind(value)
    if (info.min is not None and value < info.min) or (info.max is not None and value > info.max):
        return _NO  # Typer says why (or clamps, where asked)
    return value


def _light_kind(descriptor: Any) -> tuple[type, bool] | None:
    """(leaf type, is a list) when this module converts the parameter, else None."""
    info = descriptor.parameter_info
    if descriptor.file_annotation is not None or info.parser is not None or getattr(info, "click_type", None):
        return None
    annotation, is_list = descriptor.annotation, False
    if getattr(annotation, "__origin__", None) is list and len(getattr(annotation, "__args__", ())) == 1:
        annotation, is_list = annotation.__args__[0], True
    if annotation in (str, int, float, bool) or annotation is Path:
        if getattr(info, "path_type", None) not in (None, Path):
            return None
        return annotation, is_list
    return None


def install() -> bool:
    """Route plain parameters of every Typer command through the light conversion; True if installed."""
    try:
        from typer import _coercion, core
        from typer._param_types import coerce_cli_path
    except ImportError:
        return False
    param_cls = getattr(core, "_TyperParameter", None)
    base = getattr(_coercion, "RuntimeParam", None)
    build = getattr(_coercion, "build_runtime_param", None)
    if param_cls is None or base is None or build is None or not hasattr(param_cls, "get_runtime_param"):
        return False
    if getattr(param_cls.get_runtime_param, "_light", False):
        return True

    @dataclass(frozen=True)
    class LightRuntimeParam(base):  # type: ignore[misc, valid-type]
        """Converts plainly valid values itself; delegates everything else to Typer's adapter."""

        kind: type = str
        is_list: bool = False
        descriptor: Any = None

        def _one(self, value: Any, param: Any, ctx: Any) -> Any:
            kind = self.kind
            if kind is str:
                return value if isinstance(value, str) else _NO
            if kind is bool:
                return value if isinstance(value, bool) else _NO
            if kind is Path:
                if not isinstance(value, (str, Path)):
                    return _NO
                return coerce_cli_path(Path(value), self.parameter_info, path_type=Path, param=param, ctx=ctx)
            return _number(value, kind, self.parameter_info)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if self.is_list:
                if isinstance(value, (list, tuple)):
                    out = [self._one(v, param, ctx) for v in value]
                    if not any(v is _NO for v in out):
                        return out
            else:
                out = self._one(value, param, ctx)
                if out is not _NO:
                    return out
            return build(self.descriptor)._coerce_value(value, param=param, ctx=ctx)

    original = param_cls.get_runtime_param

    def get_runtime_param(self: Any) -> Any:
        if self._runtime_param is None:
            light = _light_kind(self.type_descriptor)
            if light is None:
                return original(self)
            d = self.type_descriptor
            self._runtime_param = LightRuntimeParam(parameter_info=d.parameter_info, annotation=d.annotation,
                                                    kind=light[0], is_list=light[1], descriptor=d)
        return self._runtime_param

    get_runtime_param._light = True  # type: ignore[attr-defined]
    param_cls.get_runtime_param = get_runtime_param
    return True
