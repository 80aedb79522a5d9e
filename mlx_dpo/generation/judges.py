"""Judges for on-policy pairs (:mod:`mlx_dpo.generation.sample`): ``f(prompt, completion) -> float``, higher is
better. Built-ins by name (:data:`JUDGES`, :data:`JUDGE_FACTORIES`) or a user's Python function.

Pure functions; ``pick_pair`` chooses best against worst, ``None`` on a tie.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import re
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple, Union
from ..errors import JudgeError

Judge = Callable[[Union[str, list], str], float]


def shorter(prompt, completion: str) -> float:
    """Fewer characters is better: ``-len(completion)``."""
    return -float(len(completion))


def longer(prompt, completion: str) -> float:
    """More characters is better: ``len(completion)``."""
    return float(len(completion))


def regex(pattern: str) -> Judge:
    """1 when ``pattern`` matches somewhere in the completion (``re.search``), else 0."""
    compiled = re.compile(pattern)
    return lambda prompt, completion: float(compiled.search(completion) is not None)


def contains(text: str) -> Judge:
    """1 when the completion contains ``text``, else 0."""
    return lambda prompt, completion: float(text in completion)


JUDGES = {"shorter": shorter, "longer": longer}  # NAME
JUDGE_FACTORIES = {"regex": regex, "contains": contains}  # NAME:ARGUMENT
JUDGE_HELP = ("shorter, longer, regex:PATTERN (a match is preferred), contains:TEXT, or a Python function "
              "module:function / path/to/file.py:function, f(prompt, completion) -> float, higher is better")


def make_judge(spec: Union[str, Judge]) -> Judge:
    """The judge named by ``spec`` (see :data:`JUDGE_HELP`); a callable is returned as is."""
    if callable(spec):
        return spec
    name, sep, arg = spec.partition(":")
    if name in JUDGES:
        if sep:
            raise JudgeError(f"judge {spec!r}: {name} takes no argument (use --judge {name})")
        return JUDGES[name]
    if name in JUDGE_FACTORIES:
        if not arg:
            raise JudgeError(f"judge {spec!r}: {name} needs an argument, e.g. --judge '{name}:{'^[A-Z]' if name == 'regex' else 'TEXT'}'")
        try:
            return JUDGE_FACTORIES[name](arg)
        except re.error as e:
            raise JudgeError(f"judge {spec!r}: invalid regular expression ({e})") from None
    if sep:
        return load_user_judge(spec)
    close = difflib.get_close_matches(name, [*JUDGES, *JUDGE_FACTORIES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise JudgeError(f"unknown judge {spec!r}{hint}; expected {JUDGE_HELP}")


def load_user_judge(spec: str) -> Judge:
    """``module:function`` (importable) or ``path/to/file.py:function``."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise JudgeError(f"judge {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser()
            if not path.is_file():
                raise JudgeError(f"judge {spec!r}: file {path} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except JudgeError:
        raise
    except ModuleNotFoundError as e:
        raise JudgeError(f"judge {spec!r}: cannot import {target} ({e}); put it on PYTHONPATH or pass "
                          "path/to/file.py:function") from None
    except Exception as e:  # the user's module failed while importing
        raise JudgeError(f"judge {spec!r}: importing {target} failed ({type(e).__name__}: {e})") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise JudgeError(f"judge {spec!r}: {target} has no function {name!r}")
    return func


def score(judge: Judge, prompt, completion: str, where: str) -> float:
    """``judge(prompt, completion)`` as a float: anything ``float()`` takes (a numpy or MLX scalar
    too) but a bool or a string, refused unless finite."""
    try:
        value = judge(prompt, completion)
    except Exception as e:
        raise JudgeError(f"{where}: the judge failed ({type(e).__name__}: {e})") from None
    try:
        number = None if isinstance(value, (bool, str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number):
        raise JudgeError(f"{where}: the judge returned {value!r}; expected a finite number (higher is better)")
    return number


def pick_pair(scores: Sequence[float]) -> Optional[Tuple[int, int]]:
    """``(best, worst)``: the first highest and the first lowest score; ``None`` on a tie."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    return None if scores[best] == scores[worst] else (best, worst)
