import json

import pytest
import timm
import torch
import torchvision
from torch import nn

from hant.errors import HantError
from hant.layers import LayerInfo, discover_layers, format_inspect, get_layer, inspect_model, set_layer


@pytest.fixture(scope="module")
def effnet():
    torch.manual_seed(0)
    return timm.create_model("efficientnet_b0", in_chans=1, num_classes=10)


@pytest.fixture(scope="module")
def effnet_layers(effnet):
    return discover_layers(effnet, (1, 32, 32))


def by_name(layers):
    return {l.name: l for l in layers}


# ------------------------------------------------------------------------------------------
# Default discovery on the model families hant targets


def test_efficientnet_b0_blocks_at_32(effnet_layers):
    layers, skipped = effnet_layers
    assert [l.name for l in layers] == [f"blocks.{i}.{j}" for i, n in enumerate([1, 2, 2, 3, 3, 4, 1])
                                        for j in range(n)]
    assert skipped == []
    d = by_name(layers)
    b00 = d["blocks.0.0"]
    assert (b00.in_shape, b00.out_shape, b00.stride) == ((32, 16, 16), (16, 16, 16), 1)
    assert (b00.in_chs, b00.out_chs) == (32, 16)
    # The stage-opening blocks that halve the map, and nothing else.
    assert {l.name for l in layers if l.stride == 2} == {"blocks.1.0", "blocks.2.0", "blocks.3.0", "blocks.5.0"}
    assert d["blocks.5.0"].in_shape == (112, 2, 2) and d["blocks.5.0"].out_shape == (192, 1, 1)
    assert d["blocks.6.0"].out_shape == (320, 1, 1)
    # Consecutive blocks chain: each input is the previous output.
    for a, b in zip(layers, layers[1:]):
        assert a.out_shape == b.in_shape


def test_efficientnet_b0_blocks_at_64_and_train_mode_restored(effnet):
    effnet.train()
    effnet.blocks[0].eval()  # a mixed state must come back exactly
    layers, _ = discover_layers(effnet, (1, 64, 64))
    assert len(layers) == 16
    d = by_name(layers)
    assert d["blocks.0.0"].in_shape == (32, 32, 32)
    assert d["blocks.6.0"].out_shape == (320, 2, 2)
    assert effnet.training and not effnet.blocks[0].training and effnet.blocks[1].training
    effnet.eval()


def test_params_and_flops(effnet, effnet_layers):
    layers, _ = effnet_layers
    for l in layers:
        assert l.params == sum(p.numel() for p in get_layer(effnet, l.name).parameters()) > 0
        assert l.flops > 0
    # blocks.0.0 = depthwise 3x3 on 32 channels, squeeze-excite 32->8->32 on the pooled 1x1
    # map, pointwise 32->16; two FLOPs per multiply-add.
    def expected(hw):
        return 2 * (9 * 32 * hw + 32 * 8 + 8 * 32 + 32 * 16 * hw)

    big, _ = discover_layers(effnet, (1, 64, 64), include=["blocks.0.0"])
    assert by_name(layers)["blocks.0.0"].flops == expected(16 * 16)
    assert big[0].flops == expected(32 * 32)


def test_conv_flops_are_two_per_multiply_add():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2))
    layers, skipped = discover_layers(model, (3, 10, 10))
    assert [l.name for l in layers] == ["0", "2"]
    assert skipped == [{"name": "1", "reason": "contains no convolution"}]
    first, second = layers
    assert first.flops == 2 * (3 * 3 * 3) * 8 * 10 * 10
    assert (second.stride, second.out_shape) == (2, (16, 5, 5))
    assert second.flops == 2 * (8 // 2 * 3 * 3) * 16 * 5 * 5
    assert first.params == 3 * 8 * 9 + 8


def test_timm_mobilenetv2_has_17_blocks():
    model = timm.create_model("mobilenetv2_100", in_chans=1, num_classes=10)
    layers, _ = discover_layers(model, (1, 32, 32))
    assert len(layers) == 17
    assert layers[0].name == "blocks.0.0" and layers[-1].name == "blocks.6.0"


@pytest.mark.parametrize("make", [lambda: timm.create_model("resnet18", in_chans=1, num_classes=10),
                                  lambda: torchvision.models.resnet18(num_classes=10)],
                         ids=["timm", "torchvision"])
def test_resnet18_layer_blocks(make):
    model = make()
    c = model.conv1.in_channels
    layers, skipped = discover_layers(model, (c, 32, 32))
    assert [l.name for l in layers] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert skipped == []
    d = by_name(layers)
    assert d["layer1.0"].in_shape == (64, 8, 8)
    assert (d["layer2.0"].stride, d["layer2.0"].out_shape) == (2, (128, 4, 4))
    assert d["layer4.1"].out_shape == (512, 1, 1)


def test_torchvision_mobilenet_v2_main_sequential():
    # No named rule applies; `features` wins over the `conv` Sequential inside every block.
    model = torchvision.models.mobilenet_v2(num_classes=10)
    layers, skipped = discover_layers(model, (3, 32, 32))
    assert [l.name for l in layers] == [f"features.{i}" for i in range(19)]
    assert skipped == []
    assert layers[0].stride == 2 and layers[0].in_shape == (3, 32, 32)


def test_torchvision_efficientnet_stages_are_looked_through():
    model = torchvision.models.efficientnet_b0(num_classes=10)
    layers, _ = discover_layers(model, (3, 32, 32))
    names = [l.name for l in layers]
    assert len(names) == 18 and names[0] == "features.0" and names[-1] == "features.8"
    assert "features.6.3" in names and "features.6" not in names


def test_timm_stages_of_other_classes_are_looked_through():
    # RegStage holds blocks b1, b2, ...; a ConvNeXt stage a downsample and a `blocks` list.
    regnet = timm.create_model("regnetx_002", num_classes=10)
    layers, skipped = discover_layers(regnet, (3, 64, 64))
    depths = [1, 1, 4, 7]
    assert [l.name for l in layers] == [f"s{i + 1}.b{j + 1}" for i, n in enumerate(depths) for j in range(n)]
    assert skipped == []
    convnext = timm.create_model("convnext_atto", num_classes=10)
    names = [l.name for l in discover_layers(convnext, (3, 64, 64))[0]]
    assert names[:3] == ["stages.0.blocks.0", "stages.0.blocks.1", "stages.1.downsample.1"]
    assert len(names) == 2 + 2 + 6 + 2 + 3 and not any(n.count(".") < 2 for n in names)


def test_csp_stages_and_dla_trees_are_split_into_blocks():
    cspnet = timm.create_model("cspresnet50", num_classes=10)
    layers, _ = discover_layers(cspnet, (3, 64, 64))
    names = [l.name for l in layers]
    assert "stages.2.blocks.4" in names and "stages.2.conv_transition" in names
    assert not any(n.count(".") < 2 for n in names)  # no whole stage
    dla = timm.create_model("dla34", num_classes=10)
    layers, skipped = discover_layers(dla, (3, 64, 64))
    names = [l.name for l in layers]
    # A tree's first child takes two tensors: its convolutions are the layers.
    assert {"level2.tree1.conv1", "level2.tree1.conv2", "level2.tree2", "level5.tree2"} <= set(names)
    assert {"name": "level2.root", "reason": "input is not a single tensor (tuple of 1)"} in skipped
    assert max(l.flops for l in layers) < 0.1 * sum(l.flops for l in layers)


class ResBlock(nn.Module):
    """Two conv-BN pairs and a shortcut: a block with wiring of its own."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        y += x if self.down is None else self.down(x)  # in place, as timm does
        return torch.relu(y)


class NumberedStage(nn.Module):
    """Blocks registered as b1, b2, ... and run in a loop."""

    def __init__(self, c_in, c_out, depth):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", ResBlock(c_in if i == 0 else c_out, c_out, 2 if i == 0 else 1))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class DownBlocksStage(nn.Module):
    def __init__(self, c_in, c_out, depth):
        super().__init__()
        self.downsample = nn.Sequential(nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c_out, 2, 2))
        self.blocks = nn.Sequential(*[ResBlock(c_out, c_out) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class SplitStage(nn.Module):
    """Half the channels through the blocks, then both halves concatenated (CSP)."""

    def __init__(self, c, depth):
        super().__init__()
        self.conv_exp = nn.Conv2d(c, 2 * c, 1)
        self.blocks = nn.Sequential(*[ResBlock(c, c) for _ in range(depth)])
        self.conv_transition = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        a, b = self.conv_exp(x).chunk(2, dim=1)
        return self.conv_transition(torch.cat([a, self.blocks(b)], dim=1))


class TwoInputBlock(ResBlock):
    def forward(self, x, shortcut):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + shortcut)


class TreeNode(nn.Module):
    """A DLA-like node: its first child takes two tensors, the last all outputs."""

    def __init__(self, c):
        super().__init__()
        self.tree1 = TwoInputBlock(c, c)
        self.tree2 = ResBlock(c, c)
        self.root = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        x1 = self.tree1(x, x)
        return self.root(torch.cat([x1, self.tree2(x1)], dim=1))


class Stages(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.s1 = NumberedStage(8, 16, 2)
        self.s2 = DownBlocksStage(16, 32, 2)
        self.s3 = SplitStage(32, 3)
        self.s4 = TreeNode(32)
        self.head = nn.Conv2d(32, 5, 1)

    def forward(self, x):
        return self.head(self.s4(self.s3(self.s2(self.s1(self.stem(x)))))).mean((2, 3))


def test_user_stages_of_any_class_give_blocks():
    layers, skipped = discover_layers(Stages(), (3, 32, 32))
    assert [l.name for l in layers] == [
        "s1.b1", "s1.b2",  # numbered blocks run in a loop
        "s2.downsample.1", "s2.blocks.0", "s2.blocks.1",  # a downsample and a block list
        "s3.conv_exp", "s3.blocks.0", "s3.blocks.1", "s3.blocks.2", "s3.conv_transition",  # large: split
        "s4.tree1.conv1", "s4.tree1.conv2", "s4.tree2", "s4.root",  # tree1 takes two tensors
    ]
    assert skipped == []
    d = by_name(layers)
    assert (d["s1.b1"].stride, d["s1.b1"].out_shape) == (2, (16, 16, 16))
    assert d["s4.tree1.conv1"].in_shape == (32, 8, 8)


class Flat(nn.Module):
    """Blocks hanging from the model itself, between a stem and a head convolution."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 2, 1)
        for i in range(5):
            self.add_module(f"block{i + 1}", ResBlock(16, 16))
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        for module in self.children():
            x = module(x)
        return x.mean((2, 3))


def test_blocks_of_the_model_itself_with_their_stem_but_not_the_head():
    layers, skipped = discover_layers(Flat(), (3, 16, 16))
    assert [l.name for l in layers] == ["stem", "block1", "block2", "block3", "block4", "block5"]
    assert skipped == []


def test_large_block_is_split_and_smaller_blocks_are_not():
    # Block 4 holds over half of the FLOPs: its convolutions become the layers. Block 5 holds
    # under a quarter and no blocks of its own: it stays whole.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), ResBlock(8, 8), ResBlock(8, 8), ResBlock(8, 8),
                          ResBlock(8, 64), ResBlock(64, 16, stride=2))
    layers, _ = discover_layers(model, (3, 16, 16))
    assert [l.name for l in layers] == ["0", "1", "2", "3", "4.conv1", "4.conv2", "4.down.0", "5"]


# ------------------------------------------------------------------------------------------
# Globs


def test_include_selects_outermost_matches(effnet):
    layers, _ = discover_layers(effnet, (1, 32, 32), include=["blocks.5.*"])
    # `*` crosses dots, so the glob also matches the insides of each block; they are dropped.
    assert [l.name for l in layers] == ["blocks.5.0", "blocks.5.1", "blocks.5.2", "blocks.5.3"]


def test_include_can_pick_parameter_free_or_inner_modules(effnet):
    layers, _ = discover_layers(effnet, (1, 32, 32), include=["conv_stem", "blocks.0.0.conv_dw"])
    assert [(l.name, l.out_shape) for l in layers] == [("conv_stem", (32, 16, 16)), ("blocks.0.0.conv_dw", (32, 16, 16))]


def test_exclude_drops_layers_and_their_stage(effnet):
    layers, skipped = discover_layers(effnet, (1, 32, 32), exclude=["blocks.6", "blocks.1.?"])
    names = [l.name for l in layers]
    assert len(names) == 13
    assert not any(n.startswith(("blocks.6", "blocks.1")) for n in names)
    assert {"name": "blocks.6.0", "reason": "excluded by 'blocks.6'"} in skipped
    assert {"name": "blocks.1.1", "reason": "excluded by 'blocks.1.?'"} in skipped


@pytest.mark.parametrize("kw", [{"include": ["blocks.9.*"]}, {"exclude": ["nope"]}])
def test_glob_matching_nothing_is_an_error(effnet, kw):
    glob = next(iter(kw.values()))[0]
    with pytest.raises(HantError, match=glob.replace(".", r"\.").replace("*", r"\*")):
        discover_layers(effnet, (1, 32, 32), **kw)


def test_excluding_everything_is_an_error(effnet):
    with pytest.raises(HantError, match="no replaceable layers.*--include"):
        discover_layers(effnet, (1, 32, 32), exclude=["blocks"])


# ------------------------------------------------------------------------------------------
# Skipped modules


class ConvBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class Split(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv(x)
        return y, -y


class Merge(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, pair):
        return self.conv(pair[0] + pair[1])


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.body = nn.Sequential(ConvBlock(8, 8), Split(8), Merge(8), ConvBlock(8, 16, stride=2),
                                  ConvBlock(16, 16))
        self.shared = ConvBlock(16, 16)
        self.tail = nn.Sequential(self.shared, self.shared)  # one module used twice
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.tail(self.body(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_toy_multi_output_and_shared_modules_are_skipped_with_reasons():
    layers, skipped = discover_layers(Toy(), (1, 12, 12))
    assert [l.name for l in layers] == ["body.0", "body.3", "body.4"]
    assert by_name(layers)["body.3"].stride == 2
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert reasons.keys() == {"body.1", "body.2"}
    assert reasons["body.1"].startswith("output is not a single tensor (tuple of 2")
    assert reasons["body.2"].startswith("input is not a single tensor")
    # Asked for explicitly, a shared module is refused with its own reason.
    layers, skipped = discover_layers(Toy(), (1, 12, 12), include=["body.0", "shared", "head"])
    reasons = {s["name"]: s["reason"] for s in skipped}
    assert [l.name for l in layers] == ["body.0"]
    assert "called 2 times" in reasons["shared"]
    assert "not a 4-D feature map" in reasons["head"]


def test_layers_do_not_overlap(effnet_layers):
    names = [l.name for l in effnet_layers[0]]
    assert not any(a != b and b.startswith(a + ".") for a in names for b in names)


def test_bad_input_size_and_failing_forward(effnet):
    with pytest.raises(HantError, match="C H W"):
        discover_layers(effnet, (32, 32))
    with pytest.raises(HantError, match="input-size"):
        discover_layers(effnet, (3, 32, 32))  # the model takes one channel


class SizeBound(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)

    def forward(self, x):
        assert x.shape[-1] == 224, f"Input height ({x.shape[-1]}) doesn't match model (224).\nmore"
        return self.conv(x)


def test_model_rejecting_the_size_gives_one_line():
    with pytest.raises(HantError) as info:
        discover_layers(SizeBound(), (3, 64, 64))
    message = str(info.value)
    assert message.startswith("SizeBound forward failed at input size 3x64x64 "
                              "(AssertionError: Input height (64) doesn't match model (224).); ")
    assert "--input-size" in message and "\n" not in message


# ------------------------------------------------------------------------------------------
# Module access and serialisation


def test_get_set_layer_round_trip(effnet):
    model = timm.create_model("efficientnet_b0", in_chans=1, num_classes=10).eval()
    original = get_layer(model, "blocks.1.0")
    assert original is model.blocks[1][0]
    replacement = nn.Conv2d(16, 24, 1, stride=2)
    set_layer(model, "blocks.1.0", replacement)
    assert get_layer(model, "blocks.1.0") is replacement and model.blocks[1][0] is replacement
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)  # still a working network
    set_layer(model, "blocks.1.0", original)
    assert model.blocks[1][0] is original
    set_layer(model, "conv_head", nn.Identity())
    assert isinstance(model.conv_head, nn.Identity)
    with pytest.raises(HantError, match="blocks.1.9"):
        get_layer(model, "blocks.1.9")
    with pytest.raises(HantError, match="blocks.1.9"):
        set_layer(model, "blocks.1.9", nn.Identity())
    with pytest.raises(HantError, match="nn.Module"):
        set_layer(model, "blocks.1.0", "conv")


def test_layer_info_dict_round_trip(effnet_layers):
    for layer in effnet_layers[0]:
        d = json.loads(json.dumps(layer.to_dict()))
        assert LayerInfo.from_dict({**d, "candidates": 5}) == layer
    d = effnet_layers[0][0].to_dict()
    del d["stride"]
    with pytest.raises(HantError, match="stride"):
        LayerInfo.from_dict(d)


# ------------------------------------------------------------------------------------------
# The preflight report (real teacher and space modules) and the command line


@pytest.fixture(scope="module")
def report():
    return inspect_model("timm:efficientnet_b0", (1, 32, 32), space="full", exclude=["blocks.6"])


def test_inspect_model_report(report):
    from hant.space import load_space

    assert json.loads(json.dumps(report)) == report
    assert (report["model"], report["input_size"], report["space"]) == ("timm:efficientnet_b0", [1, 32, 32], "full")
    assert [r["name"] for r in report["layers"]][:3] == ["blocks.0.0", "blocks.1.0", "blocks.1.1"]
    assert len(report["layers"]) == 15
    assert report["skipped"] == [{"name": "blocks.6.0", "reason": "excluded by 'blocks.6'"}]
    space = load_space("full")
    for r in report["layers"]:
        assert {"name", "in_shape", "out_shape", "stride", "params", "flops", "candidates"} <= r.keys()
        # Beyond the shape's candidates, the families derived from each block (its thinned
        # copies, its 1x1 convolutions factorised) are counted.
        assert r["candidates"] > len(space.candidates(r["in_shape"][0], r["out_shape"][0], r["stride"]))
        if r["stride"] == 1:
            assert r["candidates"] >= 197
    assert report["total_params"] > sum(r["params"] for r in report["layers"]) > 0
    assert report["total_flops"] > sum(r["flops"] for r in report["layers"]) > 0


def test_format_inspect_table(report):
    text = format_inspect(report)
    lines = text.splitlines()
    row = next(l for l in lines if l.startswith("blocks.1.0 "))
    assert row.split() == ["blocks.1.0", "16x16x16", "->", "24x8x8", "2", "6,004", "1.19",
                           str(report["layers"][1]["candidates"])]
    # Aligned: every layer row is as wide as the header underline.
    rows = [l for l in lines if l.startswith("blocks.") and "->" in l]
    assert len(rows) == 15 and len({len(l) for l in rows} | {len(lines[3])}) == 1
    assert "blocks.6.0  excluded by 'blocks.6'" in text
    assert lines[-1].startswith("15 layers, ") and f"{report['total_params']:,} params" in lines[-1]


def test_inspect_forwards_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = timm.create_model("resnet18", in_chans=1, num_classes=10)
    save_file(model.state_dict(), str(tmp_path / "t.safetensors"))
    # A checkpoint for 10 classes does not fit a 5-class model: the error must reach the user.
    with pytest.raises(HantError):
        inspect_model("timm:resnet18", (1, 32, 32), num_classes=5, checkpoint=str(tmp_path / "t.safetensors"),
                      space="tiny")


def test_cli_inspect_json_and_errors(capsys):
    from hant.cli import main

    rc = main(["inspect", "--model", "torchvision:resnet18", "--input-size", "1", "32", "32", "--space", "tiny",
               "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert [r["name"] for r in out["layers"]] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert all(r["candidates"] >= 2 for r in out["layers"])  # always `teacher` and `proj`
    rc = main(["inspect", "--model", "torchvision:resnet18", "--input-size", "1", "32", "32", "--include", "layer9*"])
    err = capsys.readouterr().err
    assert rc == 2 and "'layer9*'" in err and len(err.strip().splitlines()) == 1
