"""Pure linen modules. This package imports nothing else from mmjax."""
from mmjax.models.cnn import CNN64, CNNSmall, CNNTiny, ResNetClassifier, add_coord_channels
from mmjax.models.layers import (
    MLP,
    Attention,
    Downsample,
    GroupNorm32,
    LayerNorm32,
    ResBlock,
    SinusoidalEmbedding,
    TransformerBlock,
    Upsample,
)
from mmjax.models.text import PAD_ID, TextEncoder, TextEncoderTiny
from mmjax.models.vae import (
    VAE,
    VAE64,
    CondVAE64,
    CondVAESmall,
    CondVAETiny,
    VAEDecoder,
    VAEEncoder,
    VAESmall,
    VAETiny,
)

__all__ = [
    "MLP", "Attention", "Downsample", "GroupNorm32", "LayerNorm32", "ResBlock",
    "SinusoidalEmbedding", "TransformerBlock", "Upsample",
    "PAD_ID", "TextEncoder", "TextEncoderTiny",
    "CNN64", "CNNSmall", "CNNTiny", "ResNetClassifier", "add_coord_channels",
    "VAE", "VAE64", "CondVAE64", "CondVAESmall", "CondVAETiny", "VAEDecoder", "VAEEncoder",
    "VAESmall", "VAETiny",
]
