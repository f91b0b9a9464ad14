"""The demo: log a small CNN with ``mlflow.chimera``, show its variants, register it, load it
back by ``models:/`` URI and predict.

Run ``python -m mlflow_chimera.demo``. By default it uses MLflow's embedded setup in the working
directory: a sqlite tracking store (``mlflow.db``) and local artifacts (``mlruns/``); set
``MLFLOW_TRACKING_URI`` to use another store. Afterwards ``mlflow ui --backend-store-uri
sqlite:///mlflow.db`` shows the run, the logged model and the registered version.
"""

from __future__ import annotations

import argparse
import os
import time


def build_cnn():
    """A 4-block CNN on 3×64×64 images with random weights (nothing is downloaded)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, c_in = [], 3
    for c in (32, 64, 128, 128):
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="chimera-demo-cnn", help="registered model name")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the input example")
    args = parser.parse_args(argv)

    import numpy as np

    import mlflow
    import mlflow.chimera  # noqa: F401  (the flavor, as users import it)

    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    mlflow.set_experiment("chimera-demo")
    model = build_cnn()
    example = np.random.default_rng(0).standard_normal((args.batch, 3, 64, 64)).astype(np.float32)

    print(f"Logging a CNN with mlflow.chimera (tracking store: {mlflow.get_tracking_uri()}) ...")
    started = time.perf_counter()
    info = mlflow.chimera.log_model(model, name="cnn", input_example=example,
                                    registered_model_name=args.name)
    version = info.registered_model_version
    print(f"Logged {info.model_uri} in {time.perf_counter() - started:.1f} s; "
          f"registered as models:/{args.name}/{version}\n")

    loaded = mlflow.pyfunc.load_model(f"models:/{args.name}/{version}")
    raw = loaded.get_raw_model()
    print(raw.variant_table(), "\n")
    print(raw.explain(), "\n")

    image = example[:1]
    prediction = loaded.predict(image)
    import torch

    with torch.no_grad():
        expected = model(torch.from_numpy(image)).numpy()
    print(f"predict(batch 1) with {raw.variant.id}: class {int(prediction.argmax())}, "
          f"max abs difference from eager torch {float(np.abs(prediction - expected).max()):.2e}")
    print(f"\nServe it:  MLFLOW_TRACKING_URI={mlflow.get_tracking_uri()} "
          f"mlflow models serve -m models:/{args.name}/{version} --env-manager local")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
