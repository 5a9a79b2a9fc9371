"""Convolution factory. Temporary native-only version: the unfold CPU path replaces it."""
from mindspore import nn


def build_conv2d(in_channels, out_channels, kernel_size, *, stride=1, padding=0, groups=1,
                 has_bias=False, impl="native"):
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, pad_mode="pad",
                     padding=padding, group=groups, has_bias=has_bias)


def build_deconv2x2(in_channels, out_channels, *, impl="native"):
    return nn.Conv2dTranspose(in_channels, out_channels, 2, stride=2, has_bias=True)
