"""Preprocessing and augmentation as pure, seeded TF ops.

Every random choice comes from a `tf.random.stateless_*` / `tf.image.stateless_*` op whose
seed the caller derives from (seed, step, example position), so a batch can be recomputed
exactly, e.g. after resuming from a checkpoint. Stateful TF random ops are never used:
their draws depend on how many ops ran before, which changes between runs.

Augmentation tiers of the FractalNet paper (CIFAR / SVHN):
  "none": no augmentation;
  "+":    random horizontal flip, then translation by a uniform integer offset in
          [-MAX_SHIFT, MAX_SHIFT] per axis, the uncovered border filled with zeros (the
          images are already mean-subtracted, so zero is the mean colour);
  "++":   the same, with the border filled by reflecting the image.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from fractal_jax.checks import check_choice
from fractal_jax.config import MAX_SHIFT, NORMALIZATIONS, TIERS

_PADDING = {"+": "CONSTANT", "++": "REFLECT"}

# ImageNet's usual RGB statistics in [0, 1]: computing them over 1.28M images every run
# would be wasteful, and every reference implementation uses these.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256  # Eval: shorter side resized to this, then the central crop is taken.


def channel_stats(images: np.ndarray, normalize: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns per-channel (mean, std) of uint8 images (N, H, W, C) in [0, 1] units.

    With normalize="mean" the std is all ones, so normalising only subtracts the mean
    (the paper's preprocessing). Sums run in float64 over chunks to stay exact and to
    avoid a float copy of the whole dataset.
    """
    check_choice("normalize", normalize, NORMALIZATIONS)
    channels = images.shape[-1]
    total, total_sq = np.zeros(channels), np.zeros(channels)
    for start in range(0, len(images), 4096):
        chunk = images[start:start + 4096].reshape(-1, channels).astype(np.float64) / 255.0
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = images.size // channels
    mean = total / count
    if normalize == "mean":
        return mean.astype(np.float32), np.ones(channels, np.float32)
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def normalize_images(images: tf.Tensor, mean: np.ndarray, std: np.ndarray) -> tf.Tensor:
    """Returns (images / 255 - mean) / std as float32; `images` are in 0..255, any dtype."""
    return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def sample_augment_params(seed: tf.Tensor, batch_size: int, *, max_shift: int = MAX_SHIFT,
                          flip: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """Draws the augmentation of each example of a batch from a stateless seed (shape [2]).

    Returns (flip, shift): flip (B,) bool, whether to mirror horizontally (never, with
    flip=False: e.g. digits are not mirror-symmetric); shift (B, 2) int32, the (down, right)
    translation of the content in [-max_shift, max_shift] (the paper's is 4 px on 32×32).
    Row j depends only on (seed, j), so a process can draw for the global batch and keep
    its own rows.
    """
    flip_seed, shift_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    flips = tf.random.stateless_uniform([batch_size], seed=flip_seed) < (0.5 if flip else 0.0)
    shift = tf.random.stateless_uniform(
        [batch_size, 2], seed=shift_seed, minval=-max_shift, maxval=max_shift + 1, dtype=tf.int32
    )
    return flips, shift


def apply_augment(images: tf.Tensor, flip: tf.Tensor, shift: tf.Tensor, tier: str,
                  max_shift: int = MAX_SHIFT) -> tf.Tensor:
    """Returns the batch `images` (B, H, W, C) flipped and translated as `tier` asks.

    `images` must already be mean-subtracted, so that tier "+"'s zero padding is the mean
    colour. `flip` and `shift` come from `sample_augment_params`; "none" returns `images`.
    """
    check_choice("augment", tier, TIERS)
    if tier == "none":
        return images
    flipped = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return translate(flipped, shift, _PADDING[tier], max_shift)


def translate(images: tf.Tensor, shift: tf.Tensor, mode: str,
              max_shift: int = MAX_SHIFT) -> tf.Tensor:
    """Moves the content of each image (B, H, W, C) down/right by shift (B, 2) pixels.

    Equivalent to padding by max_shift (mode "CONSTANT": zeros, or "REFLECT") and cropping
    back to (H, W) at offset max_shift - shift (|shift| <= max_shift); the crop is a batched
    gather so that each example gets its own offset without a per-example loop.
    """
    pad = [[0, 0], [max_shift, max_shift], [max_shift, max_shift], [0, 0]]
    padded = tf.pad(images, pad, mode=mode)
    height, width = tf.shape(images)[1], tf.shape(images)[2]
    rows = max_shift - shift[:, :1] + tf.range(height)[None]  # (B, H)
    cols = max_shift - shift[:, 1:] + tf.range(width)[None]  # (B, W)
    cropped_rows = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped_rows, cols, axis=2, batch_dims=1)


def imagenet_train_image(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Returns a random-resized crop of `image` (H, W, 3) uint8, maybe mirrored: (224, 224, 3).

    The usual Inception-style crop (8%..100% of the area, aspect ratio 3/4..4/3), resized
    bilinearly, then a random horizontal flip; values stay in 0..255 (float32).
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([1, 0, 4]),
        seed=crop_seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    crop = tf.image.resize(tf.slice(image, begin, size), [IMAGENET_SIZE, IMAGENET_SIZE])
    return tf.image.stateless_random_flip_left_right(crop, seed=flip_seed)


def imagenet_eval_image(image: tf.Tensor) -> tf.Tensor:
    """Returns the central (224, 224, 3) crop of `image` resized to shorter side 256 (float32)."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = IMAGENET_RESIZE / tf.reduce_min(shape)
    resized = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32))
    top_left = (tf.shape(resized)[:2] - IMAGENET_SIZE) // 2
    return tf.slice(resized, tf.concat([top_left, [0]], 0), [IMAGENET_SIZE, IMAGENET_SIZE, 3])
