"""Evaluation: attribute accuracy with the CNN judge, FD and KID in judge features, k-NN
precision/recall, CLIP score, PSNR/SSIM."""

from mmjax.eval.attributes import ATTRIBUTES, attribute_accuracy
from mmjax.eval.clip_score import clip_score
from mmjax.eval.frechet import frechet_distance
from mmjax.eval.image import psnr, ssim
from mmjax.eval.kid import kernel_distance
from mmjax.eval.manifold import precision_recall

__all__ = ["ATTRIBUTES", "attribute_accuracy", "clip_score", "frechet_distance", "kernel_distance",
           "precision_recall", "psnr", "ssim"]
