"""Datasets, tokenizer and the Grain input pipeline (host-only numpy code)."""
from mmjax.data.classic import ClassicSource, load_cifar10, load_mnist
from mmjax.data.decode import BadImageError, decode_image
from mmjax.data.folder import FolderSource, load_folder
from mmjax.data.pipeline import (
    SOURCES,
    BatchIterator,
    RandomAccessSource,
    make_batch_dataset,
    make_batches,
    make_source,
)
from mmjax.data.shapes import (
    ATTRIBUTES,
    COLOR_NAMES,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesSource,
    caption_for,
    is_heldout,
    make_example,
    parse_caption,
    render,
    sample_labels,
)
from mmjax.data.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer

__all__ = [
    "ATTRIBUTES",
    "BOS",
    "BadImageError",
    "BatchIterator",
    "ByteTokenizer",
    "COLORS",
    "COLOR_NAMES",
    "ClassicSource",
    "EOS",
    "FolderSource",
    "HELDOUT_PAIRS",
    "PAD",
    "POSITIONS",
    "RandomAccessSource",
    "SHAPES",
    "SIZES",
    "SOURCES",
    "ShapesSource",
    "VOCAB_SIZE",
    "caption_for",
    "decode_image",
    "is_heldout",
    "load_cifar10",
    "load_folder",
    "load_mnist",
    "make_batch_dataset",
    "make_batches",
    "make_example",
    "make_source",
    "parse_caption",
    "render",
    "sample_labels",
]
