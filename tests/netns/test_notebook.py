"""examples/experiment.ipynb runs top to bottom in a real kernel (nbclient); any cell error fails."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.netns

NOTEBOOK = Path(__file__).parents[2] / "examples" / "experiment.ipynb"


def test_experiment_notebook_executes() -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError on any failing cell
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "direct after" in text and "direct again" in text
    assert any("image/png" in o.get("data", {}) for o in outputs), "the plot must render"
