"""Datasets, tokenizer and the Grain input pipeline (host-only numpy code).

Names are imported on first use: sampling from a model needs the tokenizer and the shapes
vocabulary, not Grain and the file decoders the training pipeline brings in.
"""

import importlib

_EXPORTS = {
    "classic": ("ClassicSource", "load_cifar10", "load_mnist"),
    "decode": ("BadImageError", "decode_image"),
    "folder": ("FolderSource", "load_folder"),
    "pipeline": ("SOURCES", "BatchIterator", "RandomAccessSource", "make_batch_dataset", "make_batches",
                 "make_source"),
    "shapes": ("ATTRIBUTES", "COLOR_NAMES", "COLORS", "HELDOUT_PAIRS", "POSITIONS", "SHAPES", "SIZES",
               "ShapesSource", "caption_for", "is_heldout", "make_example", "parse_caption", "render",
               "sample_labels"),
    "tokenizer": ("BOS", "EOS", "PAD", "VOCAB_SIZE", "ByteTokenizer", "WordTokenizer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'mmjax.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmjax.data.{module}"), name)


def __dir__():
    return __all__
