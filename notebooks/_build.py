"""Generate the teaching notebooks from the cell sources below (run: ``python notebooks/_build.py``).

The .ipynb files are written WITHOUT outputs (execution_count None, outputs []), so diffs stay readable and
``pytest --nbmake notebooks/`` is the single source of truth that they run. Edit the cells here, not in Jupyter,
or re-run this script after editing to normalise the files.
"""

from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _cells_01 import CELLS as CELLS_01  # noqa: E402
from _cells_02 import CELLS as CELLS_02  # noqa: E402

NOTEBOOKS = {
    "01_bellman_value_iteration.ipynb": CELLS_01,
    "02_q_learning.ipynb": CELLS_02,
}

# Every notebook is built or the build fails: an ImportError here is a broken cell file, never a skipped notebook.
from _cells_03 import CELLS as CELLS_03  # noqa: E402
from _cells_04 import CELLS as CELLS_04  # noqa: E402
from _cells_05 import CELLS as CELLS_05  # noqa: E402

NOTEBOOKS["03_policy_gradient_to_ppo.ipynb"] = CELLS_03
NOTEBOOKS["04_dpo_and_grpo_losses.ipynb"] = CELLS_04
NOTEBOOKS["05_tour_of_the_template.ipynb"] = CELLS_05


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    for kind, text in cells:
        text = text.strip("\n")
        cell = new_markdown_cell(text) if kind == "md" else new_code_cell(text)
        cell.pop("id", None)
        nb.cells.append(cell)
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb.nbformat, nb.nbformat_minor = 4, 4  # v4.4: no cell ids required
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        nb = build(cells)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / name)
        print(f"wrote {name} ({len(cells)} cells)")


if __name__ == "__main__":
    main()
