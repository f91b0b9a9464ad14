"""Test models built in code with random weights (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()


class SmallCNN(nn.Module):
    def __init__(self, channels=(16, 32, 64, 64)):
        super().__init__()
        layers, c_in = [], 3
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 10)

    def forward(self, image):
        return self.head(self.features(image).mean(dim=(2, 3)))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


class Encoder(nn.Module):
    def __init__(self, d_model=64, heads=4, layers=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, tokens):
        return self.encoder(tokens)


def transformer() -> nn.Module:
    torch.manual_seed(0)
    return Encoder().eval()


class TwoInTwoOut(nn.Module):
    """Two inputs (one positional, one usually passed by name) and a dict of two outputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, features, context):
        h = torch.tanh(self.a(features) + self.b(context))
        return {"score": h.sum(dim=1, keepdim=True), "embedding": h}


def two_in_two_out() -> nn.Module:
    torch.manual_seed(0)
    return TwoInTwoOut().eval()


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        y = self.fc(x)
        return y, y.softmax(dim=-1)


def examples(batch: int = 2, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "mlp": f32(batch, 64),
        "cnn": f32(batch, 3, 32, 32),
        "transformer": f32(batch, 16, 64),
        "two_in_two_out": {"features": f32(batch, 8), "context": f32(batch, 6)},
        "tuple_out": f32(batch, 5),
    }


BUILDERS = {
    "mlp": mlp,
    "cnn": cnn,
    "transformer": transformer,
    "two_in_two_out": two_in_two_out,
    "tuple_out": lambda: TupleOut().eval(),
}


def eager_outputs(model: nn.Module, example) -> list:
    """The eager model's outputs as a list of numpy arrays (dict outputs in key order)."""
    with torch.no_grad():
        if isinstance(example, dict):
            out = model(**{k: torch.from_numpy(v) for k, v in example.items()})
        else:
            out = model(torch.from_numpy(example))
    if isinstance(out, dict):
        return [v.numpy() for v in out.values()]
    if isinstance(out, (tuple, list)):
        return [v.numpy() for v in out]
    return [out.numpy()]
