"""Tests of the learning-rate tree (docs/algorithm.md §1 node membership) and of the generic builder: levels,
layers, unit pairing, blocks (generic and custom regexes), bad input, JSON round trip, and the
optimizer refusing a checkpoint whose tree differs."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from torch import nn

from hf_camhd import CAMHDAdam, LRTree, build_hierarchy
from hf_camhd.hierarchy import (LEVELS, HierarchyBuilder, ParamEntry, list_builders, register_builder,
                                tree_from_named_parameters, tree_from_plain_params, validate_levels)

ALL = ("global", "block", "layer", "unit", "parameter")


class Net(nn.Module):
    """Every kind of tensor docs/algorithm.md §1 names: conv with bias, conv without, norm, linear, a root-owned
    vector, a root-owned scalar, and a module holding a weight and an unpaired extra vector."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3))
        self.head = nn.Linear(6, 5)
        self.scale = nn.Parameter(torch.ones(5))     # root-owned vector: its own layer, 5 units
        self.temperature = nn.Parameter(torch.tensor(1.0))  # root-owned 0-d: its own layer, 1 unit
        self.extra = nn.Module()
        self.extra.weight = nn.Parameter(torch.randn(3, 2))
        self.extra.bias = nn.Parameter(torch.randn(3))
        self.extra.gate = nn.Parameter(torch.randn(7))  # 7 != 3: not paired, its own 7 units


def unit_ids(tree: LRTree) -> list[torch.Tensor]:
    """Independently expand the unit groups into one unit id per scalar of every entry, checking
    that every entry is a member of exactly one group and each group's count/size are consistent."""
    ids: list[torch.Tensor | None] = [None] * len(tree.entries)
    offset = 0
    for g in tree.unit_groups:
        assert g.offset == offset
        size = 0
        for i, dim in g.members:
            e = tree.entries[i]
            assert ids[i] is None, f"{e.name} is in two unit groups"
            count = e.shape[dim] if e.ndim else 1
            assert count == g.count, e.name
            shape = [1] * max(e.ndim, 1)
            if e.ndim:
                shape[dim] = count
            ids[i] = (g.offset + torch.arange(count)).reshape(shape).expand(e.shape if e.ndim else (1,))
            size += e.numel // count
        assert size == g.size
        offset += g.count
    assert offset == tree.num_units
    assert all(t is not None for t in ids), "an entry is in no unit group"
    return ids


def assert_partition(tree: LRTree):
    """Every scalar is in exactly one node per level, and node sizes add up."""
    n = tree.total_numel
    assert n == sum(e.numel for e in tree.entries)
    for lv in tree.levels:
        if lv == "parameter":
            assert tree.num_nodes(lv) == n
            continue
        sizes = tree.node_sizes(lv)
        assert len(sizes) == tree.num_nodes(lv) == len(tree.node_names(lv))
        assert sum(sizes) == n and min(sizes) > 0
    if "unit" in tree.levels:
        flat = torch.cat([t.reshape(-1) for t in unit_ids(tree)])
        assert flat.numel() == n
        assert torch.bincount(flat, minlength=tree.num_units).tolist() == tree.node_sizes("unit")


# ------------------------------------------------------------------------------------------ levels
@pytest.mark.parametrize("levels, message", [
    (("global", "layers"), "Unknown level 'layers'; expected one of global, block, layer, unit, parameter"),
    (("layer", "global"), "the first level must be 'global'"),
    (("global", "unit", "layer"), "levels must be ordered coarse to fine"),
    (("global", "layer", "layer"), "a level appears twice"),
    ((), "empty"),
    ("global,filter", "Unknown level 'filter'"),
])
def test_bad_levels_raise_naming_the_level(levels, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_levels(levels)
    with pytest.raises(ValueError, match=re.escape(message)):
        build_hierarchy(Net(), levels)


def test_levels_accept_a_comma_separated_string_and_every_ordered_subset():
    assert validate_levels("global, block,unit") == ("global", "block", "unit")
    assert LEVELS == ALL
    tree = build_hierarchy(Net(), ALL)
    for mask in range(16):
        levels = ("global",) + tuple(lv for i, lv in enumerate(ALL[1:]) if mask >> i & 1)
        sub = tree.with_levels(levels)
        assert sub.levels == levels
        assert_partition(sub)


def test_num_nodes_of_a_level_not_in_the_tree_raises():
    tree = build_hierarchy(Net(), ("global", "layer"))
    with pytest.raises(ValueError, match="Level 'unit' is not in this tree"):
        tree.num_nodes("unit")
    with pytest.raises(ValueError, match="Unknown level 'units'"):
        tree.node_names("units")


# ------------------------------------------------------------------------------------------ membership
def test_layer_and_unit_membership_follow_spec_section_1():
    model = Net()
    tree = build_hierarchy(model, ALL)
    assert_partition(tree)
    by_name = {e.name: e for e in tree.entries}
    # layer = owning module path; a root-owned tensor is its own layer
    assert tree.node_names("layer") == ["scale", "temperature", "features.0", "features.1", "features.3",
                                        "head", "extra"]
    assert by_name["head.bias"].layer == by_name["head.weight"].layer == "head"
    # units: filters (with bias), norm channels (scale + shift), linear rows (with bias), the lone vector,
    # the 0-d scalar, a weight's rows with its matching bias, and an unpaired vector on its own
    labels = [(lbl, g.count, g.size) for lbl, g in zip(tree.unit_labels, tree.unit_groups)]
    assert labels == [("scale", 5, 1), ("temperature", 1, 1), ("features.0", 4, 9), ("features.1", 4, 2),
                      ("features.3", 6, 37), ("head", 5, 7), ("extra", 3, 3), ("extra.gate", 7, 1)]
    assert tree.num_units == 5 + 1 + 4 + 4 + 6 + 5 + 3 + 7
    names = tree.node_names("unit")
    assert names[0] == "scale[0]" and names[6] == "features.0[0]" and names[-1] == "extra.gate[6]"
    assert len(names) == tree.num_units
    assert tree.node_names("parameter")[6] == "features.0.weight[0]"


def test_unit_level_is_the_papers_filter_level_on_convs():
    conv = nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.Conv2d(8, 16, 3))
    tree = build_hierarchy(conv, ("global", "unit"))
    # one node per filter: its 3x5x5 (8x3x3) kernel plus its bias
    assert tree.node_sizes("unit") == [3 * 25 + 1] * 8 + [8 * 9 + 1] * 16


def test_frozen_parameters_are_left_out_and_tied_parameters_appear_once():
    model = Net()
    model.features[1].requires_grad_(False)
    model.emb = nn.Embedding(5, 6)
    model.out = nn.Linear(6, 5, bias=False)
    model.out.weight = model.emb.weight  # tied
    tree = build_hierarchy(model, ALL)
    names = tree.param_names
    assert "features.1.weight" not in names and "features.1.bias" not in names
    assert "emb.weight" in names and "out.weight" not in names
    assert tree.total_numel == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert_partition(tree)


def test_a_model_without_trainable_parameters_raises():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_hierarchy(model, ("global", "layer"))
    with pytest.raises(ValueError, match="expected an nn.Module"):
        build_hierarchy([torch.zeros(2)], ("global",))


# ------------------------------------------------------------------------------------------ blocks
def test_generic_builder_uses_top_level_children():
    tree = build_hierarchy(Net(), ("global", "block"))
    assert tree.node_names("block") == ["scale", "temperature", "features", "head", "extra"]
    assert tree.node_sizes("block") == [5, 1, 36 + 8 + 222, 35, 16]


def test_generic_builder_warns_when_everything_lands_in_one_block():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LayerNorm(4)))  # one child, no stack
    with pytest.warns(UserWarning, match=r"lands in one block.*blocks="):
        build_hierarchy(model, ("global", "block"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_hierarchy(model, ("global", "layer"))  # no block level: nothing to warn about
        build_hierarchy(model, ("global", "block"), blocks={"a": [r"^0\.0\."], "b": [r"^0\.2\."]})
        # a stack of two Linear inside the one child: a block each
        stacked = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
        assert build_hierarchy(stacked, ("global", "block")).node_names("block") == ["0.0", "0.1"]


def test_custom_blocks_by_regex_and_fallback():
    tree = build_hierarchy(Net(), ("global", "block", "layer"),
                           blocks={"convs": [r"^features\."], "out": [r"^head\.", r"^scale$"]})
    assert tree.node_names("block") == ["out", "temperature", "convs", "extra"]
    assert tree.node_sizes("block") == [40, 1, 266, 16]
    # a single string is accepted for one regex
    tree = build_hierarchy(Net(), ("global", "block"), blocks={"convs": r"^features\."})
    assert tree.node_names("block")[2] == "convs"


@pytest.mark.parametrize("blocks, message", [
    ({"x": [r"^nothing\."]}, "regex '^nothing\\\\.' of block 'x' matches no trainable parameter"),
    ({"a": [r"^head\."], "b": [r"bias$"]},
     "parameter 'head.bias' is matched by block 'a' and by regex 'bias$' of block 'b'"),
    ({"a": [r"(unclosed"]}, "Invalid blocks regex '(unclosed' for block 'a'"),
    ({"x": [r"^features\.1\."]}, "regex '^features\\\\.1\\\\.' of block 'x' matches no trainable parameter"),
])
def test_bad_custom_blocks_raise_naming_the_regex_or_parameter(blocks, message):
    model = Net()
    model.features[1].requires_grad_(False)  # a regex matching only frozen tensors matches nothing
    with pytest.raises(ValueError, match=re.escape(message)):
        build_hierarchy(model, ("global", "block"), blocks=blocks)


def test_a_layer_split_across_blocks_raises():
    with pytest.raises(ValueError, match="layer 'head' is split across blocks"):
        build_hierarchy(Net(), ("global", "block"), blocks={"w": [r"^head\.weight$"]})


def test_builder_registry_and_forcing_a_builder():
    names = list_builders()
    assert {"hf_camhd.models", "timm", "transformers"} <= set(names) and names[-1] == "generic"
    with pytest.raises(ValueError, match="Unknown builder 'nope'"):
        build_hierarchy(Net(), ("global", "block"), builder="nope")
    with pytest.raises(ValueError, match="already registered"):
        register_builder(HierarchyBuilder("timm", lambda m: False, lambda m, n: {}))
    one_block = HierarchyBuilder("test-one-block", lambda m: False, lambda m, names: {n: "all" for n in names})
    b = register_builder(one_block, overwrite=True)
    assert b.name in list_builders()
    tree = build_hierarchy(Net(), ("global", "block"), builder="test-one-block")
    assert tree.node_names("block") == ["all"]
    assert build_hierarchy(Net(), ("global", "block"), builder="generic").num_nodes("block") == 5


def test_trees_from_named_and_plain_parameters():
    model = Net()
    named = tree_from_named_parameters(model.named_parameters(), ALL)
    assert named == build_hierarchy(model, ALL, builder="generic")
    plain = tree_from_plain_params(list(model.parameters()), ("global", "layer", "unit"))
    assert plain.num_nodes("layer") == len(list(model.parameters()))
    with pytest.raises(ValueError, match="'block' requested for plain params"):
        tree_from_plain_params(list(model.parameters()), ("global", "block"))


# ------------------------------------------------------------------------------------------ plain data
def test_print_shows_one_row_per_level():
    tree = build_hierarchy(Net(), ALL)
    text = str(tree)
    rows = [r for r in text.splitlines() if r.startswith("| ") and not r.startswith("| level")]
    assert [r.split("|")[1].strip() for r in rows] == list(ALL)
    unit_row = rows[3].split("|")
    assert unit_row[2].strip() == str(tree.num_units) and unit_row[3].strip() == str(tree.total_numel)
    assert repr(tree).startswith("LRTree(levels=")


def test_json_round_trip_gives_an_equal_tree(tmp_path):
    model = Net()
    tree = build_hierarchy(model, ALL, blocks={"convs": [r"^features\."]})
    path = tmp_path / "tree.json"
    tree.save(path)
    loaded = LRTree.load(path)
    assert loaded == tree and loaded.first_difference(tree) is None
    assert loaded.node_names("block") == tree.node_names("block")
    assert loaded.node_sizes("unit") == tree.node_sizes("unit")
    assert loaded.module is None and tree.module is model  # the module is never saved
    data = json.loads(path.read_text())
    assert data["levels"] == list(ALL) and data["params"][2] == ["features.0.weight", [4, 1, 3, 3], "features.0",
                                                                 "convs", 0]
    # unit_dim survives the round trip
    entry = ParamEntry("c.weight", (4, 6), "c", "b", 1)
    t = LRTree([entry], ("global", "block", "unit"))
    assert LRTree.from_dict(json.loads(json.dumps(t.to_dict()))).entries[0].unit_dim == 1


def test_first_difference_names_the_first_mismatching_parameter():
    a = build_hierarchy(Net(), ALL)
    other = Net()
    other.head = nn.Linear(6, 4)
    b = build_hierarchy(other, ALL)
    assert a.first_difference(b).startswith("parameter 'head.weight' differs in shape")
    assert "levels differ" in a.first_difference(a.with_levels(("global", "layer")))
    shorter = Net()
    del shorter.extra
    assert build_hierarchy(shorter, ALL).first_difference(a) == "parameter 'extra.weight' exists only in the saved tree"


def _train_one_step(model, opt):
    out = model.head(model.features(torch.randn(2, 1, 5, 5)).flatten(1)) * model.scale * model.temperature
    loss = out.square().mean() + model.extra.weight.sum() + model.extra.bias.sum() + model.extra.gate.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_optimizer_checkpoint_records_the_tree_and_refuses_a_different_model(tmp_path):
    torch.manual_seed(0)
    model = Net()
    opt = CAMHDAdam(model, lr=1e-3, levels=("global", "layer", "unit"), hypergrad_lr=1e-6, hypergrad_rule="additive")
    _train_one_step(model, opt)
    _train_one_step(model, opt)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert LRTree.from_dict(state["param_groups"][0]["camhd_tree"]) == opt.tree

    # the same architecture loads
    same = Net()
    CAMHDAdam(same, lr=1e-3, levels=("global", "layer", "unit")).load_state_dict(state)

    # a different layer: the error names the first mismatching parameter
    other = Net()
    other.head = nn.Linear(6, 4)
    with pytest.raises(ValueError, match=r"tree does not match.*parameter 'head\.weight' differs in shape"):
        CAMHDAdam(other, lr=1e-3, levels=("global", "layer", "unit")).load_state_dict(state)

    # a renamed module
    renamed = Net()
    renamed.classifier = renamed.head
    del renamed.head
    with pytest.raises(ValueError, match=r"parameter 'extra\.weight' differs in name.*saved \['head\.weight'"):
        CAMHDAdam(renamed, lr=1e-3, levels=("global", "layer", "unit")).load_state_dict(state)

    # other levels
    with pytest.raises(ValueError, match="levels differ"):
        CAMHDAdam(Net(), lr=1e-3, levels=("global", "layer")).load_state_dict(state)
