"""notebooks/chat_with_a_video.ipynb runs headlessly, top to bottom, in this venv's Python (integration test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "chat_with_a_video.ipynb"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the notebook first trains the quickstart model when it is missing
def test_chat_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A "python3" kernelspec that launches exactly this interpreter: JUPYTER_PATH comes first in Jupyter's search
    # path, so a user-level or system "python3" pointing at another Python cannot shadow it.
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "vlm venv", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # CI shares 2 cores: two spinning OpenMP threads run far slower
    # Train a small quickstart (same recipe and code path, 2 steps) outside the repository's runs/.
    run = tmp_path / "quickstart"
    monkeypatch.setenv("VLM_QUICKSTART_DIR", str(run))
    monkeypatch.setenv("VLM_DEMO_ARGS", f"--data {tmp_path / 'synth'} --num 30 --set output_dir={run} "
                                        "--set stages.0.max_steps=2")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert f"vlm from {ROOT}" in text
    assert "loaded the trained quickstart model" in text  # trained by scripts/demo.py --train-only
    assert text.count("A:") >= 5 and "the tower did not run again" in text and "media: image" in text
    assert any("image/png" in o.get("data", {}) for o in outputs if o.output_type == "display_data")  # the frame strip
