"""Bottleneck ResNet / ResNeXt backbone (torchvision / mmdetection layout, NCHW, float32).

Stem: 7x7 stride-2 convolution, BN, ReLU, 3x3 stride-2 max-pool. Four stages of bottleneck
blocks (1x1 -> 3x3 (stride, groups) -> 1x1, expansion 4), stride on the 3x3 convolution
("pytorch" style). Outputs (C2, C3, C4, C5) with 256/512/1024/2048 channels at strides
4/8/16/32. ResNeXt-101 64x4d is ``ResNet(depth=101, groups=64, base_width=4)``.

Parameter names follow torchvision (``conv1.weight``, ``bn1.gamma``, ``layer1.0.conv2.weight``,
``layer2.0.downsample.0.weight`` ...) and are identical for both convolution implementations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import mindspore as ms
from mindspore import Tensor, nn

from instaboost.models.layers.conv import build_conv2d, disable_input_grad
from instaboost.models.layers.native_kernels import layer_impl_for
from instaboost.models.layers.norm import build_norm
from instaboost.models.layers.pool import build_stem_max_pool

# depth -> number of bottleneck blocks per stage
ARCH_SETTINGS: Dict[int, Tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
STEM_CHANNELS = 64
STEM_KERNEL = 7
STEM_STRIDE = 2
STEM_PADDING = 3
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
BOTTLENECK_EXPANSION = 4
BASE_WIDTH_REFERENCE = 64
NUM_STAGES = 4
OUT_STRIDES = (4, 8, 16, 32)


class Bottleneck(nn.Cell):
    """Bottleneck residual block: (N, inplanes, H, W) -> (N, planes*4, H/stride, W/stride)."""

    expansion = BOTTLENECK_EXPANSION

    def __init__(self, inplanes: int, planes: int, *, stride: int = 1, groups: int = 1,
                 base_width: int = BASE_WIDTH_REFERENCE, conv_impl: str = "unfold",
                 norm: str = "bn", norm_eval: bool = False, frozen: bool = False):
        super().__init__()
        width = int(planes * (base_width / BASE_WIDTH_REFERENCE)) * groups
        out_planes = planes * self.expansion

        def norm_layer(channels: int, activation: str = "none") -> nn.Cell:
            return build_norm(norm, channels, norm_eval=norm_eval, frozen=frozen,
                              activation=activation, impl=layer_impl_for(conv_impl))

        self.conv1 = build_conv2d(inplanes, width, 1, impl=conv_impl)
        self.bn1 = norm_layer(width, "relu")
        self.conv2 = build_conv2d(width, width, 3, stride=stride, padding=1, groups=groups,
                                  impl=conv_impl)
        self.bn2 = norm_layer(width, "relu")
        self.conv3 = build_conv2d(width, out_planes, 1, impl=conv_impl)
        # relu(bn3(conv3(.)) + identity) in one cell: fused on the norm kernels.
        self.bn3 = norm_layer(out_planes, "add_relu")
        if stride != 1 or inplanes != out_planes:
            self.downsample = nn.SequentialCell([
                build_conv2d(inplanes, out_planes, 1, stride=stride, impl=conv_impl),
                norm_layer(out_planes),
            ])
        else:
            self.downsample = None

    def construct(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x))                   # BN + ReLU
        out = self.bn2(self.conv2(out))                 # BN + ReLU
        return self.bn3(self.conv3(out), identity)      # ReLU(BN + identity)


class ResNet(nn.Cell):
    """Bottleneck ResNet backbone returning four feature maps.

    Args:
        depth: 50, 101 or 152.
        groups, base_width: ResNeXt cardinality and width per group (1 and 64 for ResNet).
        conv_impl: "unfold" (fast CPU) or "native" (``nn.Conv2d``); same parameters either way.
        norm: "bn" (trainable BatchNorm) or "frozen_bn" (constant affine).
        norm_eval: with "bn", normalise with running statistics also in training.
        frozen_stages: -1 freezes nothing, 0 the stem, k the stem and stages 1..k
            (``requires_grad=False`` and fixed BN statistics there).

    Input: float32 (N, 3, H, W). Output: tuple of float32 (N, 256, H/4, W/4),
    (N, 512, H/8, W/8), (N, 1024, H/16, W/16), (N, 2048, H/32, W/32) (sizes rounded up).
    """

    out_channels = tuple(p * BOTTLENECK_EXPANSION for p in STAGE_PLANES)
    out_strides = OUT_STRIDES

    def __init__(self, *, depth: int = 50, groups: int = 1, base_width: int = BASE_WIDTH_REFERENCE,
                 conv_impl: str = "unfold", norm: str = "bn", norm_eval: bool = False,
                 frozen_stages: int = -1):
        super().__init__()
        if depth not in ARCH_SETTINGS:
            raise ValueError(f"ResNet depth must be one of {sorted(ARCH_SETTINGS)}, got {depth}")
        if not -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f"frozen_stages must be in [-1, {NUM_STAGES}], got {frozen_stages}")
        self.depth = depth
        self.frozen_stages = frozen_stages
        # The stem reads the image, which never needs a gradient.
        self.conv1 = disable_input_grad(build_conv2d(3, STEM_CHANNELS, STEM_KERNEL,
                                                     stride=STEM_STRIDE, padding=STEM_PADDING,
                                                     impl=conv_impl))
        self.bn1 = build_norm(norm, STEM_CHANNELS, norm_eval=norm_eval,
                              frozen=frozen_stages >= 0, activation="relu",
                              impl=layer_impl_for(conv_impl))
        self.maxpool = build_stem_max_pool(layer_impl_for(conv_impl))
        inplanes = STEM_CHANNELS
        stages: List[nn.SequentialCell] = []
        for index, (blocks, planes, stride) in enumerate(
                zip(ARCH_SETTINGS[depth], STAGE_PLANES, STAGE_STRIDES)):
            frozen = index + 1 <= frozen_stages
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(inplanes, planes, stride=stride if block == 0 else 1,
                                        groups=groups, base_width=base_width,
                                        conv_impl=conv_impl, norm=norm, norm_eval=norm_eval,
                                        frozen=frozen))
                inplanes = planes * BOTTLENECK_EXPANSION
            stages.append(nn.SequentialCell(layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self._freeze()

    def _frozen_cells(self) -> List[nn.Cell]:
        cells: List[nn.Cell] = []
        if self.frozen_stages >= 0:
            cells += [self.conv1, self.bn1]
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        cells += list(stages[:max(self.frozen_stages, 0)])
        return cells

    def _freeze(self) -> None:
        for cell in self._frozen_cells():
            for param in cell.get_parameters():
                param.requires_grad = False

    def construct(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.maxpool(self.bn1(self.conv1(x)))      # BN + ReLU
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5

    def load_pretrained(self, path: Union[str, Path], *, prefix: str = "") -> List[str]:
        """Load backbone weights from a MindSpore .ckpt; see `load_pretrained`."""
        return load_pretrained(self, path, prefix=prefix)


def load_pretrained(cell: nn.Cell, path: Union[str, Path], *, prefix: str = "") -> List[str]:
    """Copy the parameters of ``cell`` from the MindSpore checkpoint at ``path``.

    Every parameter of ``cell`` (relative name ``n``) must be present in the checkpoint as
    ``prefix + n`` with the same shape; otherwise a ValueError names the file and lists the
    missing keys and shape mismatches, and nothing is loaded. Checkpoint entries that the cell
    does not have (a classifier head, optimizer state) are ignored and returned.

    Args:
        cell: the network to fill (e.g. a `ResNet`).
        path: MindSpore ``.ckpt`` file.
        prefix: key prefix of the cell's parameters inside the checkpoint (e.g. "backbone.").

    Returns:
        Sorted checkpoint keys that were not used.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
    try:
        checkpoint = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"cannot read pretrained checkpoint {path}: {error}") from error
    params = dict(cell.parameters_and_names())
    missing = sorted(name for name in params if prefix + name not in checkpoint)
    mismatched = [f"{name}: checkpoint {tuple(checkpoint[prefix + name].shape)} vs model "
                  f"{tuple(param.shape)}"
                  for name, param in params.items()
                  if prefix + name in checkpoint
                  and tuple(checkpoint[prefix + name].shape) != tuple(param.shape)]
    if missing or mismatched:
        raise ValueError(_mismatch_message(path, prefix, missing, mismatched))
    for name, param in params.items():
        value = checkpoint[prefix + name]
        param.set_data(Tensor(value.asnumpy(), dtype=param.dtype))
    used = {prefix + name for name in params}
    return sorted(key for key in checkpoint if key not in used)


_MAX_LISTED_KEYS = 10


def _mismatch_message(path: Path, prefix: str, missing: Sequence[str],
                      mismatched: Sequence[str]) -> str:
    lines = [f"pretrained checkpoint {path} does not match the model"
             + (f" (key prefix {prefix!r})" if prefix else "") + ":"]
    if missing:
        shown = ", ".join(missing[:_MAX_LISTED_KEYS])
        more = f" ... ({len(missing)} in total)" if len(missing) > _MAX_LISTED_KEYS else ""
        lines.append(f"  missing keys: {shown}{more}")
    if mismatched:
        shown = "; ".join(mismatched[:_MAX_LISTED_KEYS])
        more = f" ... ({len(mismatched)} in total)" if len(mismatched) > _MAX_LISTED_KEYS else ""
        lines.append(f"  shape mismatches: {shown}{more}")
    return "\n".join(lines)
