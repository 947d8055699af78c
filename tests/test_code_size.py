"""The size rule: no function in ``kvtriton/`` longer than 80 lines and no module longer
than 620 (600 and a little slack), so that a reader takes in a function at a glance and a module at a
sitting. Triton kernels (``@triton.jit``, possibly under ``@triton.autotune``/``@triton.heuristics``) are
exempt: a kernel is one launch and splitting it costs registers or clarity.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kvtriton"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 620
EXCLUDED: set[str] = set()  # subpackages of kvtriton/ not under the rule
_KERNEL_DECORATORS = {"jit", "autotune", "heuristics"}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in EXCLUDED)


def _is_kernel(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Decorated with ``triton.jit`` (or ``jit``, ``triton.autotune``, ``triton.heuristics``)."""
    for dec in fn.decorator_list:
        target = dec.func if isinstance(dec, ast.Call) else dec
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in _KERNEL_DECORATORS:
            return True
    return False


def _long_functions(source: str) -> list[tuple[str, int, int]]:
    """``(name, first line, lines)`` of every function or method over the limit, kernels aside."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append((node.name, node.lineno, length))
    return out


def test_the_rule_sees_the_package():
    mods = {p.relative_to(PACKAGE).as_posix() for p in _modules()}
    assert {"ops/attention.py", "memory/pool.py", "harness/config.py", "replay/engine.py", "hf/support.py"} <= mods


def test_the_checker_measures_functions_and_exempts_kernels():
    def fn(header: str, lines: int) -> str:  # a function of exactly ``lines`` lines, its def included
        return header + "".join(f"    x{i} = {i}\n" for i in range(lines - header.count("\n")))

    source = "import triton\n\n" + "\n".join([
        fn("def long():\n", MAX_FUNCTION_LINES + 1),
        fn("def limit():\n", MAX_FUNCTION_LINES),
        fn("@triton.jit\ndef kernel():\n", 3 * MAX_FUNCTION_LINES),
        fn("@triton.autotune(configs=[], key=[])\n@triton.jit\ndef tuned():\n", 3 * MAX_FUNCTION_LINES)])
    assert _long_functions(source) == [("long", 3, MAX_FUNCTION_LINES + 1)]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_module_and_function_sizes(path):
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines (at most {MAX_MODULE_LINES}): move a cohesive "
        f"part into a module of its own")
    long = _long_functions(source)
    assert not long, "functions over {} lines (split them into named steps): {}".format(
        MAX_FUNCTION_LINES, ", ".join(f"{name} (line {line}, {n} lines)" for name, line, n in long))
