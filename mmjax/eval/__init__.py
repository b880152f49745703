"""Evaluation: the CNN judge's attribute accuracy (more metrics join here)."""

from mmjax.eval.attributes import ATTRIBUTES, attribute_accuracy

__all__ = ["ATTRIBUTES", "attribute_accuracy"]
