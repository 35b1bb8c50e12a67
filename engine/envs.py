"""Every EXASERVE_* environment variable: its type, default and meaning, in one place.

`read()` parses them once (the engine and the CLI call it at start-up) and hands back an `Env`; nothing else
in exaserve reads an EXASERVE_* variable. A value that does not parse is an error naming the variable; an
EXASERVE_* variable that is not declared here gets a warning (a typo would otherwise pass unnoticed).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

from exaserve.engine.config import KERNEL_BACKENDS

log = logging.getLogger("exaserve.engine")
PREFIX = "EXASERVE_"


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise ValueError(f"use one of {', '.join(allowed)}")
        return text
    return parse


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("use 1 or 0")


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("use a number of seconds > 0")
    return value


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


def _var(name: str, parse: Callable[[str], object], meaning: str) -> dict:
    return {"env": name, "parse": parse, "meaning": meaning}


@dataclass(frozen=True)
class Env:
    kernels: str = field(default="auto", metadata=_var(
        "EXASERVE_KERNELS", _choice(*KERNEL_BACKENDS),
        "kernel backend when the engine's `kernels` option (--kernels) is not given: auto (triton on CUDA, the C++ "
        "kernels on a CPU, torch where those cannot run), torch, cpu or triton; a backend that cannot run here "
        "stops the start with an error"))
    argmax_screen: bool = field(default=True, metadata=_var(
        "EXASERVE_ARGMAX_SCREEN", _bool,
        "0: greedy rows on the C++ CPU path compute every logit instead of going through the lm_head's int8 "
        "screen (same tokens; for A/B measurements)"))
    cpu_ext_cflags: tuple[str, ...] = field(default=(), metadata=_var(
        "EXASERVE_CPU_EXT_CFLAGS", _words,
        "extra compiler flags for the C++ CPU kernels, space separated (experiments, e.g. -DEXA_PREFETCH=64); "
        "each set of flags builds into its own folder"))
    api_key: str | None = field(default=None, metadata=_var(
        "EXASERVE_API_KEY", str, "the server's API key when --api-key is not given"))
    collective_timeout: float = field(default=120.0, metadata=_var(
        "EXASERVE_COLLECTIVE_TIMEOUT", _positive_seconds,
        "tensor parallel: seconds a collective may wait for the other ranks before the engine gives up on a hung "
        "rank (a step takes well under a second; the first steps on a GPU compile kernels)"))


VARIABLES = {f.metadata["env"]: f for f in dataclasses.fields(Env)}


def read(environ: Mapping[str, str] | None = None) -> Env:
    """The EXASERVE_* settings of `environ` (default: this process's environment)."""
    environ = os.environ if environ is None else environ
    values = {}
    for name, f in VARIABLES.items():
        text = environ.get(name)
        if text is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as e:
            raise ValueError(f"{name}={text!r}: {e}") from None
    for name in sorted(environ):
        if name.startswith(PREFIX) and name not in VARIABLES:
            log.warning("unknown environment variable %s (exaserve reads %s)", name, ", ".join(VARIABLES))
    return Env(**values)


def describe() -> str:
    """One line per variable: name, default, meaning (for --help and the README)."""
    lines = []
    for name, f in VARIABLES.items():
        default = "unset" if f.default in ((), None) else int(f.default) if isinstance(f.default, bool) else f.default
        lines.append(f"{name} (default {default}): {f.metadata['meaning']}")
    return "\n".join(lines)
