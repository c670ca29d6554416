"""Layer discovery across the CNN families of timm (and a few of torchvision).

For each architecture (its smallest variant, random weights, 10 classes, a small input):
discovery succeeds, the layers hold most of the FLOPs, no layer holds a stage's share of
them, and every candidate of the `tiny` space builds and runs at every layer's shape.
"""

import pytest
import timm
import torch
import torchvision

from hant.errors import HantError
from hant.layers import _discover, get_layer
from hant.ops import build, needs_teacher
from hant.space import load_space

# (timm name, input height = width): the smallest variant of each family at 64 px, except
# where noted.
TIMM = [
    ("resnet18", 64),
    ("regnetx_002", 64),
    ("regnety_002", 64),
    ("regnetz_005", 64),
    ("convnext_atto", 64),
    ("cspresnet50", 64),
    ("darknet17", 64),
    # The head convs (not layers) hold a third of mobilenetv3_small_050's and a quarter of
    # tinynet_e's FLOPs; the next variants up keep them under a fifth.
    ("mobilenetv3_small_100", 64),
    ("efficientnet_b0", 64),
    ("efficientnetv2_rw_t", 64),
    ("mnasnet_small", 64),
    ("ghostnet_050", 96),  # its head conv holds a fifth of the FLOPs at 64 px
    ("rexnet_100", 64),
    ("hrnet_w18_small", 64),
    ("dla34", 64),
    ("densenet121", 64),
    ("dpn48b", 64),
    ("res2net50_14w_8s", 64),
    ("resnest14d", 64),
    ("skresnet18", 64),
    ("nf_resnet26", 64),
    ("repvgg_a0", 64),
    ("mobileone_s0", 64),
    ("fbnetc_100", 64),
    ("lcnet_050", 64),
    ("tinynet_a", 64),
    ("hardcorenas_a", 64),
    ("selecsls42b", 64),
    ("tresnet_m", 64),
    ("inception_v3", 96),  # at 64 px its unpadded convolutions shrink maps below their kernel
    ("xception41", 64),
    ("legacy_xception", 64),
    ("ese_vovnet19b_dw", 64),
    ("gernet_s", 64),
    ("convmixer_768_32", 64),
    ("poolformer_s12", 64),
    ("mixnet_s", 64),
    ("hgnetv2_b0", 64),
    ("fastvit_t8", 64),
    ("efficientvit_b0", 64),
    ("mobilenetv4_conv_small", 64),
    ("rdnet_tiny", 64),
    ("edgenext_xx_small", 64),
    ("inception_next_atto", 64),
    ("starnet_s050", 64),
    ("repvit_m0_9", 64),
    ("vgg11", 64),
    ("efficientformer_l1", 224),  # attention biases fixed to 224 px
]
# Seconds on one core: 130 M weights to initialise and copy.
SLOW = {"vgg11"}
# Inception's stem shrinks its maps with unpadded convolutions (96 -> 47 -> 45, 22 -> 20),
# which no candidate reproduces, so those convolutions (about a quarter of the FLOPs) are
# skipped with that reason.
MIN_COVER = {"inception_v3": 0.7}

TORCHVISION = [
    ("regnet_x_400mf", 64),
    ("convnext_tiny", 64),
    ("mobilenet_v3_small", 64),
    ("mnasnet0_5", 64),
    ("googlenet", 64),
]

# Networks that reject a small input outright: discovery must say so in one line.
REJECTS = [
    ("vit_tiny_patch16_224", "VisionTransformer", "AssertionError"),  # patch grid fixed to 224 px
    ("levit_128s", "LevitDistilled", "RuntimeError"),  # attention biases fixed to 224 px
    ("efficientformer_l1", "EfficientFormer", "RuntimeError"),
]


@pytest.fixture(scope="module")
def tiny():
    return load_space("tiny")


def _params(entries):
    return [pytest.param(name, size, id=name, marks=[pytest.mark.slow] if name in SLOW else [])
            for name, size in entries]


def check_model(model, name, size, tiny):
    """Discover the layers of ``model`` at ``size`` px and check coverage, balance and candidates."""
    layers, skipped, total = _discover(model, (3, size, size))
    flops = sum(layer.flops for layer in layers)
    assert flops >= MIN_COVER.get(name, 0.8) * total, (
        f"layers hold {flops / total:.0%} of the FLOPs; skipped: {skipped}")
    largest = max(layers, key=lambda layer: layer.flops)
    if len(layers) >= 4:
        assert largest.flops <= 0.3 * flops, f"{largest.name} holds {largest.flops / flops:.0%} of the layers' FLOPs"
    names = [layer.name for layer in layers]
    assert not any(b.startswith(a + ".") for a in names for b in names), "layers overlap"

    # A candidate that does not copy the teacher depends only on the layer's shape: build it
    # once per shape. `teacher` copies and runs each layer.
    built = set()
    for layer in layers:
        teacher = get_layer(model, layer.name)
        for spec in tiny.candidates(layer.in_chs, layer.out_chs, layer.stride):
            key = (spec, layer.in_shape, layer.out_shape, layer.stride)
            if key in built and not needs_teacher(spec):
                continue
            build(spec, layer.in_chs, layer.out_chs, layer.stride, teacher_layer=teacher,
                  in_hw=layer.in_shape[1:], out_hw=layer.out_shape[1:])
            built.add(key)
    return layers


@pytest.mark.parametrize("name,size", _params(TIMM))
def test_timm_zoo(name, size, tiny, one_thread):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    check_model(model, name, size, tiny)


@pytest.mark.filterwarnings("ignore:The default weight initialization:FutureWarning")
@pytest.mark.parametrize("name,size", _params(TORCHVISION))
def test_torchvision_zoo(name, size, tiny, one_thread):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    check_model(model, name, size, tiny)


@pytest.mark.parametrize("name,cls,error", REJECTS, ids=[r[0] for r in REJECTS])
def test_small_input_rejected_in_one_line(name, cls, error, one_thread):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with pytest.raises(HantError) as info:
        _discover(model, (3, 64, 64))
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{cls} forward failed at input size 3x64x64 ({error}: ")
    assert "--input-size" in message


@pytest.mark.parametrize("stride,hw", [(3, 16), (4, 16), (4, 15), (4, 47)])
def test_large_stride_layers_get_only_candidates_that_keep_the_size(stride, hw):
    # timm's blocks pad a strided convolution for stride 2 only: at stride 4 a 3x3 gives 5x5
    # from 16x16. Such layers exist (hgnetv2_b0's stem, inception_v3's Mixed_7a at 96 px).
    full = load_space("full")
    offered = full.candidates(8, 16, stride)
    assert not any(s.startswith(("mb_", "fmb_", "ds_", "conv_")) for s in offered)
    out = -(-hw // stride)
    for spec in offered:
        if spec != "teacher":
            build(spec, 8, 16, stride, in_hw=(hw, hw), out_hw=(out, out))
