"""Tests of the hierarchy builders for timm, transformers and hf_camhd.models, and of the
``python -m hf_camhd.hierarchy`` CLI. Node counts are checked against counts computed independently
here from ``named_modules()`` (docs/algorithm.md §1), not read back from the tree."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import timm
import torch
import transformers
from timm.models._manipulate import group_with_matcher
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_camhd import build_hierarchy
from hf_camhd.hierarchy import LRTree
from hf_camhd.hierarchy.__main__ import TRANSFORMERS_MODELS, build_named_model, main
from hf_camhd.models import MLP, LeNet5

ALL = ("global", "block", "layer", "unit", "parameter")
transformers.logging.set_verbosity_error()


# ------------------------------------------------------------------------------------------ independent checks
def expected_layers_and_units(model: nn.Module) -> tuple[list[str], int]:
    """Spec §1 from the module tree: a layer per module owning trainable tensors (a root-owned
    tensor is its own layer); units = the weight's output units (dim 0, dim 1 for GPT-2's Conv1D)
    plus, for any other tensor of the module that is not a vector of that length, its dim-0 size."""
    kept = {id(p) for n, p in model.named_parameters() if p.requires_grad}  # tied tensors once
    layers, units, seen = [], 0, set()
    for path, mod in model.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) in kept and id(p) not in seen]
        seen.update(id(p) for _, p in own)
        if not own:
            continue
        if not path:  # root-owned tensors: each its own layer and its own units
            for n, p in own:
                layers.append(n)
                units += p.shape[0] if p.ndim else 1
            continue
        layers.append(path)
        weight = dict(own).get("weight")
        anchor = weight if weight is not None and weight.ndim >= 1 else next((p for _, p in own if p.ndim), own[0][1])
        n_units = (anchor.shape[1] if isinstance(mod, Conv1D) and anchor is weight else anchor.shape[0]) \
            if anchor.ndim else 1
        units += n_units
        for _, p in own:
            if p is anchor or (p.ndim == 1 and p.shape[0] == n_units):
                continue
            units += p.shape[0] if p.ndim else 1
    return layers, units


def assert_every_scalar_in_one_node_per_level(model: nn.Module, tree: LRTree) -> None:
    """The tree's entries are exactly the trainable tensors (tied once, frozen never), and at every
    level each scalar has exactly one node (unit groups expanded scalar by scalar)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert tree.param_names == [n for n, _ in trainable]
    assert [e.shape for e in tree.entries] == [tuple(p.shape) for _, p in trainable]
    n = sum(p.numel() for _, p in trainable)
    assert tree.total_numel == n and tree.num_nodes("parameter") == n
    assert all(e.block is not None for e in tree.entries)
    for lv in ("global", "block", "layer", "unit"):
        sizes = tree.node_sizes(lv)
        assert sum(sizes) == n and min(sizes) > 0 and len(sizes) == tree.num_nodes(lv)
    pieces = []
    seen = [0] * len(tree.entries)
    for g in tree.unit_groups:
        for i, dim in g.members:
            e = tree.entries[i]
            seen[i] += 1
            count = e.shape[dim] if e.ndim else 1
            assert count == g.count, e.name
            shape = [1] * max(e.ndim, 1)
            if e.ndim:
                shape[dim] = count
            ids = (g.offset + torch.arange(count)).reshape(shape).expand(e.shape if e.ndim else (1,))
            pieces.append(ids.reshape(-1))
    covered = torch.bincount(torch.cat(pieces), minlength=tree.num_units)
    assert seen == [1] * len(tree.entries), "a tensor is in no unit group, or in two"
    assert covered.tolist() == tree.node_sizes("unit")
    assert int(covered.sum()) == n
    layers, units = expected_layers_and_units(model)
    assert tree.node_names("layer") == layers
    assert tree.num_units == units


# ------------------------------------------------------------------------------------------ timm
@functools.cache
def timm_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False)


def test_timm_resnet18_blocks_are_stem_eight_basic_blocks_head():
    model = timm_model("resnet18")
    tree = build_hierarchy(model, ALL)
    assert tree.node_names("block") == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0",
                                        "layer3.1", "layer4.0", "layer4.1", "head"]
    blocks = {e.name: e.block for e in tree.entries}
    assert blocks["conv1.weight"] == blocks["bn1.bias"] == "stem"
    assert blocks["layer2.0.downsample.0.weight"] == "layer2.0"
    assert blocks["fc.weight"] == blocks["fc.bias"] == "head"
    # independent counts from named_modules(): 20 convs + 20 norms + fc; units = sum of out channels
    layers = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    units = sum(m.weight.shape[0] for n, m in model.named_modules() if n in layers)
    assert tree.num_nodes("layer") == len(layers) == 41
    assert tree.num_units == units
    assert_every_scalar_in_one_node_per_level(model, tree)


@pytest.mark.parametrize("name, depths", [("resnet34", (3, 4, 6, 3)), ("resnet50", (3, 4, 6, 3))])
def test_timm_resnet34_50_blocks(name, depths):
    model = timm_model(name)
    tree = build_hierarchy(model, ALL)
    expected = ["stem"] + [f"layer{s + 1}.{i}" for s, d in enumerate(depths) for i in range(d)] + ["head"]
    assert tree.node_names("block") == expected and len(expected) == 18
    layers = [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
    assert tree.num_nodes("layer") == len(layers)
    assert tree.num_units == sum(m.weight.shape[0] for n, m in model.named_modules() if n in layers)
    assert_every_scalar_in_one_node_per_level(model, tree)


@pytest.mark.parametrize("name, n_blocks, some_names", [
    ("vit_tiny_patch16_224", 14, {"cls_token": "stem", "pos_embed": "stem", "patch_embed.proj.weight": "stem",
                                  "blocks.0.attn.qkv.weight": "blocks.0", "norm.weight": "blocks.11",
                                  "head.weight": "head"}),
    ("convnext_atto", 14, {"stem.0.weight": "stem", "stages.1.downsample.1.weight": "stages.1.blocks.0",
                           "stages.3.blocks.1.gamma": "stages.3.blocks.1", "head.norm.weight": "head"}),
    ("efficientnet_b0", 18, {"conv_stem.weight": "stem", "bn1.weight": "stem", "blocks.6.0.conv_pw.weight":
                             "blocks.6.0", "conv_head.weight": "blocks.6.0", "classifier.bias": "head"}),
])
def test_timm_vit_convnext_efficientnet(name, n_blocks, some_names):
    model = timm_model(name)
    tree = build_hierarchy(model, ALL)
    # the groups timm itself derives from the model's group_matcher
    names = [n for n, _ in model.named_parameters()]
    groups = group_with_matcher(((n, n) for n in names), model.group_matcher(coarse=False))
    assert tree.num_nodes("block") == len(groups) == n_blocks
    assert sorted(sorted(v) for v in groups.values()) == sorted(
        sorted(e.name for e in tree.entries if e.block == b) for b in tree.node_names("block"))
    assert tree.node_names("block")[0] == "stem" and tree.node_names("block")[-1] == "head"
    blocks = {e.name: e.block for e in tree.entries}
    for param, block in some_names.items():
        assert blocks[param] == block, param
    assert_every_scalar_in_one_node_per_level(model, tree)


def test_timm_frozen_stem_and_custom_blocks():
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    model.conv1.requires_grad_(False)
    model.bn1.requires_grad_(False)
    tree = build_hierarchy(model, ("global", "block", "layer"))
    assert tree.node_names("block")[:2] == ["layer1.0", "layer1.1"] and tree.num_nodes("block") == 9
    assert "conv1.weight" not in tree.param_names
    assert_every_scalar_in_one_node_per_level(model, build_hierarchy(model, ALL))
    tree = build_hierarchy(model, ("global", "block"), blocks={"early": [r"^layer[12]\."]})
    assert tree.node_names("block") == ["early", "layer3.0", "layer3.1", "layer4.0", "layer4.1", "head"]


# ------------------------------------------------------------------------------------------ transformers
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    T = transformers
    if kind == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**TINY))
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=99, n_positions=64))
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=1, **TINY))
    if kind == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                                       num_decoder_layers=3, num_heads=4, vocab_size=99))
    if kind == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=3,
                                                       **{k: v for k, v in TINY.items() if k != "vocab_size"}))
    raise ValueError(kind)


# (model, blocks, {param: block}, tied names that must be absent)
TRANSFORMERS_CASES = {
    "bert": (["stem", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"],
             {"bert.embeddings.word_embeddings.weight": "stem", "bert.embeddings.LayerNorm.bias": "stem",
              "bert.encoder.layer.1.output.dense.weight": "bert.encoder.layer.1",
              "bert.pooler.dense.weight": "head", "classifier.bias": "head"}, []),
    "gpt2": (["stem", "transformer.h.0", "transformer.h.1", "transformer.h.2", "head"],
             {"transformer.wte.weight": "stem", "transformer.wpe.weight": "stem",
              "transformer.h.2.attn.c_attn.weight": "transformer.h.2", "transformer.ln_f.weight": "head"},
             ["lm_head.weight"]),
    "llama": (["stem", "model.layers.0", "model.layers.1", "head"],
              {"model.embed_tokens.weight": "stem", "model.layers.0.mlp.down_proj.weight": "model.layers.0",
               "model.norm.weight": "head", "lm_head.weight": "head"}, []),
    "t5": (["stem", "encoder.block.0", "encoder.block.1", "encoder.head", "decoder.block.0", "decoder.block.1",
            "decoder.block.2", "head"],
           {"shared.weight": "stem",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "encoder.block.0",
            "encoder.final_layer_norm.weight": "encoder.head",
            "decoder.block.2.layer.1.EncDecAttention.o.weight": "decoder.block.2",
            "decoder.final_layer_norm.weight": "head"},
           ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]),
    "vit": (["stem", "vit.layers.0", "vit.layers.1", "head"],
            {"vit.embeddings.cls_token": "stem", "vit.embeddings.patch_embeddings.projection.weight": "stem",
             "vit.layernorm.weight": "head", "classifier.weight": "head"}, []),
}


@pytest.mark.parametrize("kind", list(TRANSFORMERS_CASES))
def test_transformers_blocks_are_stem_each_layer_head(kind):
    blocks, some, tied_absent = TRANSFORMERS_CASES[kind]
    model = tiny(kind)
    tree = build_hierarchy(model, ALL)
    assert tree.node_names("block") == blocks
    got = {e.name: e.block for e in tree.entries}
    for param, block in some.items():
        assert got[param] == block, param
    for name in tied_absent:  # a tied tensor appears once, under its first name
        assert name not in got
    assert_every_scalar_in_one_node_per_level(model, tree)


def test_transformers_tied_weights_are_one_tensor_counted_once():
    model = tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    tree = build_hierarchy(model, ALL)
    assert tree.total_numel == sum(p.numel() for p in model.parameters())  # parameters() dedups too
    assert tree.param_names.count("transformer.wte.weight") == 1
    t5 = tiny("t5")
    assert t5.encoder.embed_tokens.weight is t5.shared.weight is t5.decoder.embed_tokens.weight
    assert [n for n in build_hierarchy(t5, ("global",)).param_names if n.endswith("embed_tokens.weight")] == []


def test_gpt2_conv1d_units_follow_the_output_dimension():
    model = tiny("gpt2")
    tree = build_hierarchy(model, ("global", "layer", "unit"))
    by_name = {e.name: (i, e) for i, e in enumerate(tree.entries)}
    i, e = by_name["transformer.h.0.attn.c_attn.weight"]
    assert e.shape == (32, 96) and e.unit_dim == 1  # Conv1D stores [in, out]
    g = tree.unit_groups[tree.entry_unit_group[i]]
    j, _ = by_name["transformer.h.0.attn.c_attn.bias"]
    assert g.count == 96 and g.size == 32 + 1 and sorted(g.members) == [(i, 1), (j, 0)]
    i, e = by_name["transformer.h.0.mlp.c_proj.weight"]  # [4*32 in, 32 out]
    assert e.unit_dim == 1 and tree.unit_groups[tree.entry_unit_group[i]].count == 32
    # nn.Linear / Embedding weights keep dim 0
    assert by_name["transformer.wte.weight"][1].unit_dim == 0
    assert all(e.unit_dim == 0 for e in build_hierarchy(tiny("llama"), ("global", "unit")).entries)


def test_transformers_frozen_parameters_appear_in_no_node():
    model = tiny("bert")
    model.bert.embeddings.word_embeddings.requires_grad_(False)
    tree = build_hierarchy(model, ALL)
    assert "bert.embeddings.word_embeddings.weight" not in tree.param_names
    assert tree.node_names("block") == TRANSFORMERS_CASES["bert"][0]  # the rest of the stem stays
    assert "bert.embeddings.word_embeddings" not in tree.node_names("layer")
    assert_every_scalar_in_one_node_per_level(model, tree)
    # a whole frozen stem: the layers keep their blocks, nothing moves into the head
    gpt = tiny("gpt2")
    gpt.transformer.wte.requires_grad_(False)
    gpt.transformer.wpe.requires_grad_(False)
    tree = build_hierarchy(gpt, ALL)
    assert tree.node_names("block") == TRANSFORMERS_CASES["gpt2"][0][1:]
    assert_every_scalar_in_one_node_per_level(gpt, tree)


def test_transformers_embeddings_registered_after_layers_stay_in_the_stem():
    T = transformers
    model = T.BartForConditionalGeneration(T.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=37, decoder_ffn_dim=37, vocab_size=99, max_position_embeddings=64))
    tree = build_hierarchy(model, ALL)
    got = {e.name: e.block for e in tree.entries}
    assert tree.node_names("block") == ["stem", "model.encoder.layers.0", "model.encoder.layers.1",
                                        "model.decoder.stem", "model.decoder.layers.0", "model.decoder.layers.1"]
    assert got["model.encoder.layernorm_embedding.weight"] == "stem"
    assert got["model.decoder.embed_positions.weight"] == got["model.decoder.layernorm_embedding.bias"] \
        == "model.decoder.stem"
    assert_every_scalar_in_one_node_per_level(model, tree)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)


class _OldStyleModel(transformers.PreTrainedModel):
    """A PreTrainedModel whose layers do not subclass GradientCheckpointingLayer."""

    config_class = transformers.PretrainedConfig
    _no_split_modules = ["_Block"]

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(5, 4)
        self.blocks = nn.ModuleList(_Block() for _ in range(getattr(config, "n_blocks", 3)))
        self.out = nn.Linear(4, 2)
        self.post_init()


def test_transformers_layers_without_the_base_class_fall_back_to_no_split_modules_then_generic(monkeypatch):
    tree = build_hierarchy(_OldStyleModel(transformers.PretrainedConfig()), ALL)
    assert tree.node_names("block") == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    monkeypatch.setattr(_OldStyleModel, "_no_split_modules", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the generic builder finds the repeated stack: nothing to warn about
        tree = build_hierarchy(_OldStyleModel(transformers.PretrainedConfig()), ALL)
    assert tree.node_names("block") == ["stem", "blocks.0", "blocks.1", "blocks.2", "head"]
    with pytest.warns(UserWarning, match="found no transformer layers in _OldStyleModel.*blocks="):
        tree = build_hierarchy(_OldStyleModel(transformers.PretrainedConfig(n_blocks=1)), ("global", "block"))
    assert tree.node_names("block") == ["embed", "blocks", "out"]


# ------------------------------------------------------------------------------------------ generic: stacks
def _encoder_layer(d: int = 16) -> nn.TransformerEncoderLayer:
    return nn.TransformerEncoderLayer(d_model=d, nhead=2, dim_feedforward=32, batch_first=True)


class NanoBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))


class NanoGPT(nn.Module):
    """Written as nanoGPT is: embeddings, a ModuleList of blocks and a final norm in a ModuleDict, a tied head."""

    def __init__(self, n_layer: int, d: int = 16, vocab: int = 50, tied: bool = True):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(vocab, d), wpe=nn.Embedding(8, d), drop=nn.Dropout(),
                                              h=nn.ModuleList(NanoBlock(d) for _ in range(n_layer)),
                                              ln_f=nn.LayerNorm(d)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.transformer.wte.weight


def _no_warning_tree(model: nn.Module, levels=ALL) -> LRTree:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree = build_hierarchy(model, levels)
        assert_every_scalar_in_one_node_per_level(model, build_hierarchy(model, ALL))
    return tree


def _block_of(tree: LRTree) -> dict[str, str]:
    return {e.name: e.block for e in tree.entries}


def test_torch_transformer_encoder_gets_one_block_per_layer():
    layer = _encoder_layer()
    tree = _no_warning_tree(nn.TransformerEncoder(layer, num_layers=6), ("global", "block", "layer"))
    # nothing is registered before or after the layers, so there is no stem and no head block
    assert tree.node_names("block") == [f"layers.{i}" for i in range(6)]
    assert all(b == ".".join(n.split(".")[:2]) for n, b in _block_of(tree).items())
    with_norm = _no_warning_tree(nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(16)))
    assert with_norm.node_names("block") == ["layers.0", "layers.1", "layers.2", "head"]
    assert _block_of(with_norm)["norm.weight"] == "head"


def test_torch_transformer_gets_both_stacks_and_their_norms():
    model = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=3, num_decoder_layers=2, dim_feedforward=32,
                           batch_first=True)
    tree = _no_warning_tree(model)
    assert tree.node_names("block") == ["encoder.layers.0", "encoder.layers.1", "encoder.layers.2", "encoder.head",
                                        "decoder.layers.0", "decoder.layers.1", "head"]
    blocks = _block_of(tree)
    assert blocks["encoder.norm.weight"] == "encoder.head" and blocks["decoder.norm.bias"] == "head"
    assert blocks["decoder.layers.1.multihead_attn.in_proj_weight"] == "decoder.layers.1"


@pytest.mark.parametrize("n_layer", [2, 4, 6])
def test_nanogpt_style_model_has_stem_each_layer_head(n_layer):
    tree = _no_warning_tree(NanoGPT(n_layer))
    assert tree.node_names("block") == ["stem", *[f"transformer.h.{i}" for i in range(n_layer)], "head"]
    assert tree.num_nodes("block") == n_layer + 2
    blocks = _block_of(tree)
    assert blocks["transformer.wte.weight"] == blocks["transformer.wpe.weight"] == "stem"  # lm_head is wte (tied)
    assert blocks["transformer.ln_f.weight"] == "head"
    assert blocks["transformer.h.1.mlp.2.weight"] == "transformer.h.1"  # the block's own Sequential is inside it
    untied = _no_warning_tree(NanoGPT(n_layer, tied=False))
    assert _block_of(untied)["lm_head.weight"] == "head" and untied.num_nodes("block") == n_layer + 2


class _Wrap(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def test_a_stack_nested_in_wrappers_and_small_stacks_that_do_not_count():
    blocks = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)) for _ in range(3)])
    heads = nn.ModuleList([nn.Linear(32, 2), nn.Linear(32, 2)])  # a stack too, of much smaller modules
    model = _Wrap(patch=nn.Linear(8, 32), backbone=_Wrap(inner=_Wrap(encoder=blocks)), heads=heads)
    tree = _no_warning_tree(model)
    assert tree.node_names("block") == ["stem", "backbone.inner.encoder.0", "backbone.inner.encoder.1",
                                        "backbone.inner.encoder.2", "head"]
    assert {n for n, b in _block_of(tree).items() if b == "head"} == {f"heads.{i}.{k}" for i in (0, 1)
                                                                       for k in ("weight", "bias")}
    # a frozen layer is in no block; the stack is what stays trainable
    blocks[0].requires_grad_(False)
    tree = _no_warning_tree(model)
    assert tree.node_names("block") == ["stem", "backbone.inner.encoder.1", "backbone.inner.encoder.2", "head"]


@pytest.mark.parametrize("model, blocks", [
    # no stack: today's top-level children
    (_Wrap(a=nn.Linear(4, 4), b=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8))), ["a", "b"]),
    # a stack holding less than half of the parameters does not count
    (_Wrap(big=nn.Linear(64, 64), small=nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))), ["big", "small"]),
    # an MLP written as one Sequential: the stack is the model itself, each Linear a block (as before)
    (nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), ["0", "2", "4"]),
])
def test_models_without_a_counting_stack_keep_top_level_children(model, blocks):
    assert _no_warning_tree(model, ("global", "block")).node_names("block") == blocks


# ------------------------------------------------------------------------------------------ our models
@pytest.mark.parametrize("model", [LeNet5(in_channels=3, image_size=32), LeNet5(image_size=8),
                                   MLP(input_size=64, hidden_sizes=[32, 16, 8]), MLP(input_size=64, hidden_sizes=[])],
                         ids=["lenet5-32", "lenet5-8", "mlp-3", "mlp-0"])
def test_lenet_and_mlp_one_block_per_stage(model):
    tree = build_hierarchy(model, ALL)
    assert tree.node_names("block") == model.block_names()
    assert tree.node_names("layer") == model.block_names()
    for e in tree.entries:
        assert e.name.startswith(e.block + ".")
    assert_every_scalar_in_one_node_per_level(model, tree)


def test_lenet_filter_level_is_the_unit_level():
    tree = build_hierarchy(LeNet5(in_channels=1, image_size=28), ("global", "unit"))
    sizes = tree.node_sizes("unit")
    assert tree.num_units == 6 + 16 + 120 + 84 + 10
    assert sizes[:6] == [25 + 1] * 6 and sizes[6:22] == [6 * 25 + 1] * 16  # a filter with its bias


# ------------------------------------------------------------------------------------------ CLI
def test_cli_prints_the_table_and_block_nodes(capsys):
    assert main(["resnet18", "--levels", "global,block,layer,unit", "--nodes", "block"]) == 0
    out = capsys.readouterr().out
    assert "| block " in out and "| 10 " in out.replace("  ", " ")
    rows = [r.split("|")[1].strip() for r in out.split("block nodes (10)")[1].splitlines() if r.startswith("| ")]
    assert rows[1:] == ["stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
                        "layer4.1", "head"]


@pytest.mark.parametrize("name", ["lenet5", "mlp", "t5-tiny", "llama-tiny"])
def test_cli_builds_our_models_and_builtin_configs(name, capsys, tmp_path):
    path = tmp_path / "tree.json"
    assert main([name, "--nodes", "block", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    tree = LRTree.load(path)
    assert f"block nodes ({tree.num_nodes('block')})" in out
    assert tree == build_hierarchy(build_named_model(name, device="cpu"), ALL)
    if name == "t5-tiny":
        assert "encoder.head" in out and "decoder.block.1" in out


def test_cli_unit_listing_is_limited_and_bad_input_exits_with_status_2(capsys):
    assert main(["lenet5", "--levels", "global,unit", "--nodes", "unit", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "conv1[2]" in out and "conv1[3]" not in out and "233 more" in out
    for argv, message in [(["no-such-model"], "Unknown model 'no-such-model'"),
                          (["mlp", "--levels", "global,layers"], "Unknown level 'layers'"),
                          (["mlp", "--levels", "global,layer", "--nodes", "block"], "not in --levels")]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_builtin_config_list_builds_without_download():
    assert {"bert-base", "bert-tiny", "gpt2", "llama-tiny", "t5-small", "vit-base"} <= set(TRANSFORMERS_MODELS)
    model = build_named_model("bert-base")  # on the meta device: no memory, no download
    assert next(model.parameters()).device.type == "meta"
    tree = build_hierarchy(model, ("global", "block"))
    assert tree.num_nodes("block") == 14 and tree.total_numel > 100_000_000
    assert json.loads(json.dumps(tree.to_dict()))["levels"] == ["global", "block"]
