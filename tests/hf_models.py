"""A catalogue of small Hugging Face ``transformers`` models for coverage tests.

Every model is built from a tiny config object with random weights (nothing is
downloaded) and is handed over exactly as ``transformers`` returns it: no
wrapper modules.  ``build()`` seeds torch and calls ``.eval()``, as
``from_pretrained`` does.  ``example(batch=2, seed=0)`` returns what a user
would pass by keyword, as numpy arrays:

* text models: ``{"input_ids": int64 [batch, seq], "attention_mask": int64 [batch, seq]}``;
  the last row is padded (trailing zeros in the mask, pad token in the ids);
* vision models: ``{"pixel_values": float32 [batch, 3, H, W]}``;
* audio models: ``{"input_features": float32 [batch, mel, frames]}`` (Whisper) or
  ``{"input_values": float32 [batch, samples]}`` (Wav2Vec2).

``ARCHITECTURES`` maps a name to a spec with ``family``, ``build``, ``example``
and ``fast`` (exactly one entry, BERT, runs in the fast test tier; the full suite runs all).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict

import numpy as np
import torch
import transformers

SEQ_LEN = 12
VOCAB = 512
IMAGE = 32
AUDIO_SAMPLES = 1600


@dataclass(frozen=True)
class Spec:
    family: str
    build: Callable[[], torch.nn.Module]
    example: Callable[..., Dict[str, np.ndarray]]
    fast: bool = False


def _builder(model_cls, config_cls, **config):
    def build():
        torch.manual_seed(0)
        return model_cls(config_cls(**config)).eval()

    build.__name__ = f"build_{model_cls.__name__}"
    return build


# --------------------------------------------------------------------------- examples


def _text(pad_id: int, low: int = 3, vocab: int = VOCAB, seq: int = SEQ_LEN):
    """input_ids/attention_mask; the last row has its trailing third padded."""

    def example(batch: int = 2, seed: int = 0) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        ids = rng.integers(low, vocab, size=(batch, seq), dtype=np.int64)
        mask = np.ones((batch, seq), dtype=np.int64)
        if batch > 1:
            cut = seq - seq // 3
            mask[-1, cut:] = 0
            ids[-1, cut:] = pad_id
        return {"input_ids": ids, "attention_mask": mask}

    return example


def _image(size: int = IMAGE, channels: int = 3):
    def example(batch: int = 2, seed: int = 0) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"pixel_values": rng.standard_normal((batch, channels, size, size), dtype=np.float32)}

    return example


def _whisper_features(mel: int, frames: int):
    def example(batch: int = 2, seed: int = 0) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"input_features": rng.standard_normal((batch, mel, frames), dtype=np.float32)}

    return example


def _waveform(samples: int = AUDIO_SAMPLES):
    def example(batch: int = 2, seed: int = 0) -> Dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"input_values": (0.1 * rng.standard_normal((batch, samples))).astype(np.float32)}

    return example


# --------------------------------------------------------------------------- configs

_ENC = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
)

_VIT = dict(
    image_size=IMAGE,
    patch_size=8,
    num_channels=3,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)

_WHISPER_MEL = 16
_WHISPER_POSITIONS = 16  # the encoder needs exactly 2 * max_source_positions frames

ARCHITECTURES: "OrderedDict[str, Spec]" = OrderedDict(
    [
        # ----------------------------------------------------------------- encoders
        (
            "bert",
            Spec(
                "encoder",
                _builder(transformers.BertModel, transformers.BertConfig, **_ENC),
                _text(pad_id=0),
                fast=True,
            ),
        ),
        (
            "distilbert",
            Spec(
                "encoder",
                _builder(
                    transformers.DistilBertModel,
                    transformers.DistilBertConfig,
                    vocab_size=VOCAB,
                    dim=32,
                    n_layers=2,
                    n_heads=2,
                    hidden_dim=64,
                    max_position_embeddings=64,
                ),
                _text(pad_id=0),
            ),
        ),
        (
            "roberta",
            Spec(
                "encoder",
                _builder(transformers.RobertaModel, transformers.RobertaConfig, **_ENC),
                _text(pad_id=1),  # RoBERTa derives position ids from the pad token (id 1)
            ),
        ),
        (
            "albert",
            Spec(
                "encoder",
                _builder(transformers.AlbertModel, transformers.AlbertConfig, embedding_size=16, **_ENC),
                _text(pad_id=0),
            ),
        ),
        (
            "electra",
            Spec(
                "encoder",
                _builder(transformers.ElectraModel, transformers.ElectraConfig, embedding_size=16, **_ENC),
                _text(pad_id=0),
            ),
        ),
        (
            "deberta-v2",
            Spec(
                "relative-attention encoder",
                _builder(
                    transformers.DebertaV2Model,
                    transformers.DebertaV2Config,
                    relative_attention=True,
                    position_buckets=16,
                    max_relative_positions=-1,
                    pos_att_type=["p2c", "c2p"],
                    **_ENC,
                ),
                _text(pad_id=0),
            ),
        ),
        # ----------------------------------------------------------------- decoder LM
        (
            "gpt2-lm",
            Spec(
                "decoder LM",
                _builder(
                    transformers.GPT2LMHeadModel,
                    transformers.GPT2Config,
                    vocab_size=VOCAB,
                    n_positions=64,
                    n_embd=32,
                    n_layer=2,
                    n_head=2,
                    bos_token_id=VOCAB - 1,
                    eos_token_id=VOCAB - 1,
                ),
                _text(pad_id=VOCAB - 1),  # GPT-2 has no pad token: users pad with eos
            ),
        ),
        # ----------------------------------------------------------------- encoder-decoder part
        (
            "t5-encoder",
            Spec(
                "encoder-decoder part",
                _builder(
                    transformers.T5EncoderModel,
                    transformers.T5Config,
                    vocab_size=VOCAB,
                    d_model=32,
                    d_kv=16,
                    d_ff=64,
                    num_layers=2,
                    num_heads=2,
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=32,
                ),
                _text(pad_id=0),
            ),
        ),
        # ----------------------------------------------------------------- vision transformers
        (
            "vit",
            Spec(
                "vision transformer",
                _builder(transformers.ViTModel, transformers.ViTConfig, **_VIT),
                _image(),
                fast=False,
            ),
        ),
        (
            "deit",
            Spec(
                "vision transformer",
                _builder(transformers.DeiTModel, transformers.DeiTConfig, **_VIT),
                _image(),
            ),
        ),
        (
            "swin",
            Spec(
                "vision transformer",
                _builder(
                    transformers.SwinModel,
                    transformers.SwinConfig,
                    image_size=IMAGE,
                    patch_size=4,
                    num_channels=3,
                    embed_dim=16,
                    depths=[1, 1],
                    num_heads=[2, 2],
                    window_size=4,
                    mlp_ratio=2.0,
                ),
                _image(),
            ),
        ),
        (
            "clip-vision",
            Spec(
                "vision transformer",
                _builder(
                    transformers.CLIPVisionModel,
                    transformers.CLIPVisionConfig,
                    projection_dim=32,
                    **_VIT,
                ),
                _image(),
            ),
        ),
        # ----------------------------------------------------------------- conv nets
        (
            "convnext",
            Spec(
                "conv net",
                _builder(
                    transformers.ConvNextModel,
                    transformers.ConvNextConfig,
                    num_channels=3,
                    patch_size=4,
                    num_stages=2,
                    hidden_sizes=[16, 32],
                    depths=[1, 1],
                    image_size=IMAGE,
                ),
                _image(),
            ),
        ),
        (
            "resnet",
            Spec(
                "conv net",
                _builder(
                    transformers.ResNetModel,
                    transformers.ResNetConfig,
                    num_channels=3,
                    embedding_size=16,
                    hidden_sizes=[16, 32],
                    depths=[1, 1],
                    layer_type="basic",
                ),
                _image(),
                fast=False,
            ),
        ),
        (
            "mobilenet-v2",
            Spec(
                "conv net",
                _builder(
                    transformers.MobileNetV2Model,
                    transformers.MobileNetV2Config,
                    num_channels=3,
                    image_size=IMAGE,
                    depth_multiplier=0.25,
                    min_depth=4,
                    finegrained_output=False,
                ),
                _image(),
            ),
        ),
        # ----------------------------------------------------------------- audio encoders
        (
            "whisper-encoder",
            Spec(
                "audio encoder",
                _builder(
                    transformers.WhisperForAudioClassification,
                    transformers.WhisperConfig,
                    vocab_size=VOCAB,
                    num_mel_bins=_WHISPER_MEL,
                    d_model=32,
                    encoder_layers=2,
                    encoder_attention_heads=2,
                    encoder_ffn_dim=64,
                    decoder_layers=2,
                    decoder_attention_heads=2,
                    decoder_ffn_dim=64,
                    max_source_positions=_WHISPER_POSITIONS,
                    max_target_positions=32,
                    classifier_proj_size=16,
                    num_labels=3,
                    # special tokens inside the tiny vocabulary
                    pad_token_id=VOCAB - 2,
                    bos_token_id=VOCAB - 2,
                    eos_token_id=VOCAB - 2,
                    decoder_start_token_id=VOCAB - 1,
                    suppress_tokens=None,
                    begin_suppress_tokens=None,
                ),
                _whisper_features(_WHISPER_MEL, 2 * _WHISPER_POSITIONS),
            ),
        ),
        (
            "wav2vec2",
            Spec(
                "audio encoder",
                _builder(
                    transformers.Wav2Vec2Model,
                    transformers.Wav2Vec2Config,
                    hidden_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    intermediate_size=64,
                    conv_dim=(32, 32),
                    conv_stride=(5, 2),
                    conv_kernel=(10, 3),
                    num_conv_pos_embeddings=16,
                    num_conv_pos_embedding_groups=4,
                ),
                _waveform(),
            ),
        ),
    ]
)

assert sum(spec.fast for spec in ARCHITECTURES.values()) == 1
