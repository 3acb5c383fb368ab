"""Image normalisation shared by training, evaluation and prediction."""
import jax.numpy as jnp


def normalize(images, mean, std, image_hw=None):
  """(x - mean) / std, with the padding outside `image_hw` set to 0 when given.

  Args:
    images: [B, H, W, 3] float RGB on the 0-255 scale.
    mean, std: length-3 sequences (0-255 scale).
    image_hw: optional [B, 2] int32 valid (height, width) of each image inside the padding.
      detectron2 pads *after* normalisation with zeros at test time; during training the
      mapper pads with 128 *before* it, which the input pipeline already did.
  Returns:
    [B, H, W, 3] float32.
  """
  x = (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(
      std, jnp.float32)
  if image_hw is not None:
    h, w = images.shape[1], images.shape[2]
    rows = jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None]
    cols = jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]
    x = jnp.where((rows & cols)[..., None], x, 0.0)
  return x
