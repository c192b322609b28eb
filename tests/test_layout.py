"""The layout a forker relies on (issue 14): the plain path stays short, and speed machinery stays in ``src/accel/``.

Lines of code are counted as cloc does: no blank lines, comments or docstrings (the docstrings state each loss's
equation and paper; they are worth reading, not a cost to cut).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def code_lines(path: Path, spans: list[tuple[int, int]] | None = None) -> int:
    """Lines holding code (not blank, comment or docstring), optionally only those inside ``spans``."""
    text = path.read_text()
    docs: set[int] = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and body:
            first = body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                docs.update(range(first.lineno, first.end_lineno + 1))
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in skip:
            lines.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docs)
    if spans is not None:
        lines = {n for n in lines if any(a <= n <= b for a, b in spans)}
    return len(lines)


def _imported(module: Path, source: str) -> set[str]:
    """Names ``module`` imports from ``source`` (``from src.losses import a, b``)."""
    return {
        a.name
        for n in ast.walk(ast.parse(module.read_text()))
        if isinstance(n, ast.ImportFrom) and n.module == source
        for a in n.names
    }


def _closure(defs: dict[str, ast.AST], start: set[str], uses) -> list[tuple[int, int]]:
    seen: set[str] = set()
    todo = [n for n in start if n in defs]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [n for n in uses(defs[name]) if n in defs and n not in seen]
    return [(defs[n].lineno, defs[n].end_lineno) for n in seen]


def losses_used(*modules: Path) -> list[tuple[int, int]]:
    """Spans of the ``src/losses.py`` definitions the modules import, with what those use in turn."""
    path = SRC / "losses.py"
    defs: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defs[node.name] = node
        elif isinstance(node, ast.Assign):
            defs.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
    names = lambda node: {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}  # noqa: E731
    return _closure(defs, set().union(*(_imported(m, "src.losses") for m in modules)), names)


def dpo_reading_path() -> dict[str, int]:
    """Lines of code a reader follows for DPO's whole computation, as issue 14 counts them: ``src/modules/dpo.py``,
    the plain log-prob path ``src/logprobs.py`` and what those two use of ``src/losses.py``."""
    dpo, logprobs = SRC / "modules" / "dpo.py", SRC / "logprobs.py"
    return {
        "src/modules/dpo.py": code_lines(dpo),
        "src/logprobs.py": code_lines(logprobs),
        "src/losses.py (what DPO uses)": code_lines(SRC / "losses.py", losses_used(dpo, logprobs)),
    }


def test_dpo_reads_in_one_sitting():
    parts = dpo_reading_path()
    assert sum(parts.values()) <= 600, parts
    assert parts["src/losses.py (what DPO uses)"] >= 150  # the measure sees dpo_loss and token_logps


def test_base_module_is_short():
    n = len((SRC / "modules" / "base.py").read_text().splitlines())
    assert n <= 350, f"src/modules/base.py has {n} lines"


# What only src/accel/ may touch: attention internals, cache classes, allocator settings; and nobody reads private
# Lightning attributes.
ACCEL_ONLY = re.compile(
    r"_attn_implementation|AttentionInterface|_global_mapping|mallopt|ctypes|class \w+\((Dynamic|Static)?Cache\)"
)
PRIVATE_LIGHTNING = re.compile(r"_logger_connector|_parse_ckpt_path|_step_supports_amp_scaling|_checkpoint_connector")


def test_speed_machinery_stays_in_accel():
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        if not rel.startswith("src/accel/") and ACCEL_ONLY.search(text):
            offenders.append(f"{rel}: {ACCEL_ONLY.search(text).group(0)}")
        if PRIVATE_LIGHTNING.search(text):
            offenders.append(f"{rel}: {PRIVATE_LIGHTNING.search(text).group(0)}")
    assert not offenders, offenders


def test_the_measures_can_fail(tmp_path):
    """The line counter counts code only, and the scan finds what it looks for."""
    f = tmp_path / "m.py"
    f.write_text(
        '"""doc\nstring"""\n\n# comment\nx = 1\n\n\ndef g():\n    """doc"""\n    return (x +\n            1)\n'
    )
    assert code_lines(f) == 4  # x = 1, def g():, and the two lines of the return
    assert ACCEL_ONLY.search("model.config._attn_implementation = 'sdpa'")
    assert PRIVATE_LIGHTNING.search("trainer._logger_connector.log_metrics")
