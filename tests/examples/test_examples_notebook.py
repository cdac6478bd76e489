"""examples/colab_cifar_resnet.ipynb: every cell runs on CPU with a tiny configuration and mock data.

The notebook is executed by a real Jupyter kernel (nbclient); a cell inserted after the
``parameters`` cell (the papermill convention) shrinks the run.
"""

import json

import nbformat
import pytest
from nbclient import NotebookClient

import examples_support as support

NOTEBOOK = support.EXAMPLES / "colab_cifar_resnet.ipynb"


def _tiny_parameters(workdir) -> str:
  return "\n".join([
      'MODEL = "resnet8"', "FP_EPOCHS = 1", "PHASE1_EPOCHS = 1", "PHASE2_EPOCHS = 1",
      f'WORKDIR = "{workdir}"',
      'EXTRA_FLAGS = "--mock_data=32 --batch_size=16 --eval_batch_size=16 '
      '--width_multiplier=0.5 --num_devices=1"'])


def test_notebook_names_a_parameters_cell_and_states_time_and_accuracy():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1
  intro = notebook.cells[0].source
  assert "What to expect" in intro and "Accuracy" in intro and "Time" in intro


@pytest.mark.slow  # ~45 s on 2 CPU cores
def test_every_cell_runs_on_cpu_with_mock_data(tmp_path):
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  index = next(i for i, c in enumerate(notebook.cells)
               if "parameters" in c.metadata.get("tags", []))
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(_tiny_parameters(tmp_path / "run")))
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(support.EXAMPLES)}}).execute()
  text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.get("outputs", []))
  assert "EC2T summary" in text and "EC2T ternary test accuracy" in text
  assert json.loads((tmp_path / "run" / "report.json").read_text())["model"] == "resnet8"
  images = [out for cell in notebook.cells for out in cell.get("outputs", [])
            if "image/png" in out.get("data", {})]
  assert len(images) == 1  # the training curves
