"""The model set, built in code with random weights (``torch.manual_seed(0)``); nothing is
downloaded.

Sizes follow ``shared/BASELINES.md`` so that figures can be compared with it:

* ``mlp``: 784-512-512-10, ReLU; input float32 [batch, 784].
* ``cnn``: 4 × [Conv3x3 → BatchNorm → ReLU → MaxPool2] with 32, 64, 128, 128 channels on
  3×64×64, global average pool, Linear → 10; non-trivial BatchNorm statistics.
* ``transformer``: ``nn.TransformerEncoder``, 4 layers, d_model 256, 4 heads, feed-forward 2048
  (PyTorch's default), batch_first, on sequences of 128 tokens; input float32 [batch, 128, 256].
* ``bert``: ``transformers.BertModel`` from a small ``BertConfig`` (hidden 128, 2 layers,
  2 heads, intermediate 256, vocabulary 1000, SDPA attention) on sequences of 64 token ids;
  input int64 ``input_ids`` [batch, 64] with 0 as padding. The attention mask is derived from
  the padding inside the model and the output is ``last_hidden_state`` [batch, 64, 128]: one
  tensor in, one tensor out, because ``mlflow.pytorch``'s pyfunc takes exactly one array and
  must return one tensor (a two-input ``input_ids``/``attention_mask`` model could be logged by
  ``mlflow.chimera`` and ``mlflow.onnx``, but not served by ``mlflow.pytorch``'s pyfunc).

Every model is logged with an example of batch 2: ``torch.export`` (used by chimera and by
``mlflow.pytorch``'s ``pt2`` format) specialises a batch of 1 to a constant, so a batch-1
example would give ``mlflow.pytorch`` a model that only accepts batch 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SEED = 0
EXAMPLE_BATCH = 2
MODEL_NAMES = ("mlp", "cnn", "transformer", "bert")


@dataclass
class ModelSpec:
    name: str
    module: object  # torch.nn.Module in eval mode
    description: str
    input_shape: list  # without the batch dimension
    input_dtype: str
    make_input: object  # (batch, seed) -> np.ndarray
    notes: list = field(default_factory=list)

    def example(self) -> np.ndarray:
        return self.make_input(EXAMPLE_BATCH, SEED)


def _floats(shape):
    def make(batch: int, seed: int) -> np.ndarray:
        return np.random.default_rng(seed).standard_normal((batch, *shape), dtype=np.float32)

    return make


def mlp():
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    module = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return ModelSpec("mlp", module.eval(), "MLP 784-512-512-10 (ReLU)", [784], "float32", _floats((784,)))


def cnn():
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self, channels=(32, 64, 128, 128), classes=10):
            super().__init__()
            layers, c_in = [], 3
            for c in channels:
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
                c_in = c
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(c_in, classes)

        def forward(self, image):
            return self.head(self.features(image).mean(dim=(2, 3)))

    torch.manual_seed(SEED)
    module = CNN()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return ModelSpec("cnn", module.eval(), "CNN 4×[conv3x3-BN-ReLU-maxpool] 32/64/128/128 ch, 3×64×64 → 10",
                     [3, 64, 64], "float32", _floats((3, 64, 64)))


def transformer():
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self, d_model=256, heads=4, layers=4):
            super().__init__()
            layer = nn.TransformerEncoderLayer(d_model, heads, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

        def forward(self, tokens):
            return self.encoder(tokens)

    torch.manual_seed(SEED)
    return ModelSpec("transformer", Encoder().eval(),
                     "nn.TransformerEncoder 4 layers, d_model 256, 4 heads, ff 2048, seq 128",
                     [128, 256], "float32", _floats((128, 256)))


BERT_SEQ = 64
BERT_VOCAB = 1000


def bert():
    import torch
    from torch import nn
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                        vocab_size=BERT_VOCAB, max_position_embeddings=128, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    class BertEncoder(nn.Module):
        """input_ids (0 = padding) -> last_hidden_state; the attention mask comes from the padding."""

        def __init__(self):
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=False)

        def forward(self, input_ids):
            mask = (input_ids != 0).to(torch.int64)
            return self.bert(input_ids=input_ids, attention_mask=mask).last_hidden_state

    def make(batch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, BERT_VOCAB, size=(batch, BERT_SEQ), dtype=np.int64)
        lengths = rng.integers(BERT_SEQ // 2, BERT_SEQ + 1, size=batch)
        lengths[0] = BERT_SEQ  # at least one full row
        for row, n in enumerate(lengths):
            ids[row, n:] = 0
        return ids

    torch.manual_seed(SEED)
    import transformers

    return ModelSpec("bert", BertEncoder().eval(),
                     f"transformers {transformers.__version__} BertModel (hidden 128, 2 layers, 2 heads, "
                     f"ff 256, vocab 1000), seq {BERT_SEQ} token ids with padding → last_hidden_state",
                     [BERT_SEQ], "int64", make,
                     notes=["one input (input_ids; the attention mask is derived from padding id 0) and "
                            "one output, because mlflow.pytorch's pyfunc takes one array and returns one tensor"])


BUILDERS = {"mlp": mlp, "cnn": cnn, "transformer": transformer, "bert": bert}


def build(name: str) -> ModelSpec:
    try:
        return BUILDERS[name]()
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(BUILDERS)}") from None
