"""Learning-rate trees (global / block / layer / unit / parameter) and the builders that make them."""

from .builders import (
    HierarchyBuilder,
    build_hierarchy,
    list_builders,
    register_builder,
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
    "build_hierarchy",
    "list_builders",
    "register_builder",
    "tree_from_named_parameters",
    "tree_from_plain_params",
    "validate_levels",
]
