"""Input constants every model, converter and reference shares, as timm's `data/constants.py`.

A model takes float NHWC images in [0, 1] and normalises them itself, (x - mean) / std per RGB
channel, with one of these pairs; uint8 pixels reach [0, 1] by `lc_jax.batches.to_unit`.
"""

# The largest uint8 pixel value: pixels 0..PIXEL_MAX map to [0, 1] by dividing by it.
PIXEL_MAX = 255

# torchvision's ImageNet statistics (ResNet, DeiT, ConvNeXt and most checkpoints).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Inputs scaled to [-1, 1], as Inception's (EfficientNet-Lite, timm's augreg ViTs).
IMAGENET_INCEPTION_MEAN = (0.5, 0.5, 0.5)
IMAGENET_INCEPTION_STD = (0.5, 0.5, 0.5)
# No normalisation: models trained on [0, 1] RGB as it is (SimCLRv2, the diffusion-noise model).
NO_MEAN = (0.0, 0.0, 0.0)
NO_STD = (1.0, 1.0, 1.0)
