"""Load a model written by ``python -m experiments.export`` and predict.

  python -m experiments.export --workdir=runs/my_run --out=exports/my_model
  python docs/export_example.py exports/my_model

`load` needs only the model code (`jdistill.models`), flax and orbax: no
optimizer state, teacher or training code. The rest prints the model's
predictions for the first test examples of the dataset it was trained on.
"""

import json
import os
import sys

import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jdistill.models import create_model


def load(path):
  """The NNX model of the export at ``path``, and its model.json."""
  path = os.path.abspath(path)  # orbax takes absolute paths.
  with open(os.path.join(path, "model.json")) as f:
    spec = json.load(f)
  model = create_model(spec["name"], num_classes=spec["num_classes"],
                       input_shape=spec["input_shape"], rngs=nnx.Rngs(0),
                       **spec["kwargs"])
  _, params, model_state = nnx.split(model, nnx.Param, ...)
  like = {"params": nnx.to_pure_dict(params),
          "model_state": nnx.to_pure_dict(model_state)}
  variables = ocp.StandardCheckpointer().restore(
      os.path.join(path, "variables"), like)
  nnx.update(model, variables["params"], variables["model_state"])
  return model, spec


def main(path, num_examples=8):
  """Prints the predicted and true labels of a few test examples."""
  from jdistill.data import load_dataset  # Only for the example inputs.
  model, spec = load(path)
  test = load_dataset(spec["dataset"]).test.get_batch(np.arange(num_examples))
  logits, _ = model(test["x"], train=False)
  print("predicted:", np.argmax(logits, axis=-1).tolist())
  print("label:    ", test["y"].tolist())


if __name__ == "__main__":
  main(sys.argv[1])
