"""Learning-rate trees (global / block / layer / unit / parameter) and the builders that make them."""

from .builders import (
    HierarchyBuilder,
    blocks_from_layers,
    build_hierarchy,
    list_builders,
    register_builder,
    repeated_stacks,
    tree_from_named_parameters,
    tree_from_plain_params,
)
from .tree import LEVELS, LRTree, ParamEntry, UnitGroup, validate_levels

__all__ = [
    "LEVELS",
    "HierarchyBuilder",
    "LRTree",
    "ParamEntry",
    "UnitGroup",
    "blocks_from_layers",
    "build_hierarchy",
    "list_builders",
    "register_builder",
    "repeated_stacks",
    "tree_from_named_parameters",
    "tree_from_plain_params",
    "validate_levels",
]
