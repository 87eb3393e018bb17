"""The ``hf-camhd`` console command: ``compare`` (the paper's experiments) and ``tree`` (print a model's LR tree).

    hf-camhd compare                                   # the small offline default (digits, MLP, 3 seeds)
    hf-camhd compare --task lenet5-fashion-mnist --seeds 5 --optimizers adam,adam-hd,adam-camhd
    hf-camhd compare --task lenet5-fashion-mnist --sweep-gamma
    hf-camhd compare --task lenet5-fashion-mnist --sweep-hypergrad-lr --seeds 3
    accelerate launch -m hf_camhd.cli compare --task resnet18-cifar10   # multi-GPU / mixed precision
    hf-camhd tree --help

Each subcommand is one handler in :data:`SUBCOMMANDS`; a new one is a parser-builder plus a handler.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence

__all__ = ["main", "build_parser", "SUBCOMMANDS"]


# ------------------------------------------------------------------------------------------------ helpers
def _csv(kind: type = str) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        try:
            return tuple(kind(t) for t in items)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    parse.__name__ = f"comma-separated {kind.__name__} list"
    return parse


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _error(message: str) -> int:
    print(f"hf-camhd: error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------------------ compare
def _add_compare_parser(subparsers) -> None:
    # note: only the light modules (names and presets): `hf-camhd --help` imports no model or data stack
    from .data.info import list_datasets
    from .experiments.arms import arm_names
    from .experiments.models import MODELS
    from .experiments.presets import DEFAULT_TASK, SWEEP_GAMMAS, SWEEP_HYPERGRAD_LRS, TASKS

    tasks = "\n".join(f"  {name:22s} {t.description}" for name, t in TASKS.items())
    p = subparsers.add_parser(
        "compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="compare optimizers (CAM-HD vs baselines) over seeds; writes results.json, results.md, plots",
        description=(
            "Train a model with each optimizer arm and seed, and report test accuracy (mean ± s.e.), losses\n"
            "and the learned γ / α per level. With no arguments: the small offline default (MLP on\n"
            "scikit-learn's digits, Adam vs Adam-HD vs Adam-CAM-HD with the paper's rule and the default one,\n"
            "3 seeds, well under two minutes on 2 CPU cores). Interrupted comparisons resume: finished runs are skipped, an unfinished one continues\n"
            "from its last finished epoch (OUTPUT_DIR/checkpoints).\n\n"
            f"tasks (--task, default {DEFAULT_TASK}):\n{tasks}\n\n"
            "arms (--optimizers): " + ", ".join(arm_names()) + "\n"
            "  (baselines; prodigy, schedulefree-adamw, dadapt-adam, dog, ldog: the learning-rate-free\n"
            "   optimizers, as their READMEs recommend; *-hd = global-only hyper-gradient; *-camhd = the task's\n"
            "   2-level tree or --levels, the paper's additive rule and β; -2level / -3level pick the paper's\n"
            "   trees; *-normalized = the scale-free rule with the optimizer's default β, δ, ρ; sfadamw-camhd =\n"
            "   CAM-HD over Schedule-Free AdamW; see hf_camhd.experiments.arms)\n\n"
            "β sensitivity (--sweep-hypergrad-lr): per base of --bases, the base optimizer and its CAM-HD arm\n"
            "on each rule of --rules at each β of the rule's grid (× --seeds); default grids:\n"
            + "".join(f"  {rule} {family}: " + ", ".join(f"{b:g}" for b in grid) + "\n"
                      for (rule, family), grid in SWEEP_HYPERGRAD_LRS.items()) + "\n"
            "multi-GPU / mixed precision (ResNet presets):\n"
            "  accelerate launch --multi_gpu --num_processes 4 --mixed_precision bf16 \\\n"
            "      -m hf_camhd.cli compare --task resnet18-cifar10"),
    )
    p.add_argument("--task", default=DEFAULT_TASK, help="task preset (Table 1 settings), see above")
    p.add_argument("--model", choices=MODELS, help="override the task's model")
    p.add_argument("--dataset", choices=list_datasets(), help="override the task's dataset")
    p.add_argument("--optimizers", type=_csv(), metavar="A,B,...",
                   help="comma-separated arms (default: the task's list)")
    p.add_argument("--seeds", type=_positive_int, default=3, metavar="N", help="runs per arm (default 3)")
    p.add_argument("--first-seed", type=_nonnegative_int, default=0, metavar="S", help="seeds S … S+N−1 (default 0)")
    p.add_argument("--epochs", type=_positive_int, help="override the task's epochs")
    p.add_argument("--batch-size", type=_positive_int, help="override the task's (global) batch size")
    p.add_argument("--eval-batch-size", type=_positive_int, default=1000, help="test batch size (default 1000)")
    p.add_argument("--levels", type=_csv(), metavar="L1,L2,...",
                   help="CAM-HD tree of the *-camhd arms, e.g. global,layer,unit (global first)")
    p.add_argument("--gamma", type=_csv(float), metavar="G1,G2,...",
                   help="initial γ of the *-camhd arms, in --levels order (global first)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA if available (under accelerate launch its config decides)")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"),
                   help="default: accelerate's config / environment, else no")
    p.add_argument("--output-dir", help="default outputs/compare-<task> (outputs/sweep-gamma-<task>, "
                                        "outputs/sweep-hypergrad-lr-<task> for the sweeps)")
    p.add_argument("--data-dir", help="local dataset folder (save_to_disk, parquet or IDX files)")
    p.add_argument("--sweep-gamma", action="store_true",
                   help="the paper's Figure 1: 2-level Adam-CAM-HD with FIXED γ (δ = 0) at γ_global = "
                        + ", ".join(f"{g:g}" for g in SWEEP_GAMMAS))
    p.add_argument("--sweep-values", type=_csv(float), metavar="G,...", help="γ_global values of the sweep")
    p.add_argument("--sweep-hypergrad-lr", action="store_true",
                   help="the β-sensitivity study (see above); writes sweep_hypergrad_lr.png and a table per base")
    p.add_argument("--bases", type=_csv(), metavar="B,...",
                   help="with --sweep-hypergrad-lr: base optimizers among adam, adamw, sgd, sgdn (default adam,sgdn)")
    p.add_argument("--rules", type=_csv(), metavar="R,...",
                   help="with --sweep-hypergrad-lr: additive, normalized or both (default both)")
    p.add_argument("--betas", type=_csv(float), metavar="B,...",
                   help="with --sweep-hypergrad-lr: β values for every rule instead of the default grids (pair it "
                        "with one --rules value to give that rule its own grid)")
    p.add_argument("--max-train-samples", type=_positive_int, metavar="N",
                   help="train on a fixed random subset of N examples (quick runs; recorded in the results)")
    p.add_argument("--max-test-samples", type=_positive_int, metavar="N", help="evaluate on a subset of N examples")
    p.add_argument("--log-every", type=_positive_int, default=50, metavar="STEPS",
                   help="record γ and mean α per level every STEPS optimizer steps (default 50)")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch threads on CPU (default 1: fastest for these small models, safe on a busy machine)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="rerun every run (the old results.json is kept as results.previous.json)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's last checkpoint (OUTPUT_DIR/checkpoints/<run>.pt: weights, optimizer and "
                        "generator states) instead of deleting it when the run finishes")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="do not write the PNG plots")
    g = p.add_argument_group("publishing (hf_camhd.hub)")
    g.add_argument("--push-to-hub", action="store_true",
                   help="publish the best seed of --hub-optimizer as OUTPUT_DIR/hub and upload it")
    g.add_argument("--hub-model-id", metavar="USER/NAME", help="the Hub repository (needed with --push-to-hub)")
    g.add_argument("--hub-optimizer", metavar="ARM", help="the arm to publish (default: the first CAM-HD arm)")
    g.add_argument("--hub-private", action="store_true", help="create the repository private")
    g.add_argument("--hub-token", help="default: the token of `hf auth login`")
    p.set_defaults(handler=_cmd_compare)


def _cmd_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        from .experiments import CompareConfig, run_comparison  # first: its error names the experiments extra
        from ._extras import MissingDependencyError
        from .data import DatasetUnavailableError
    except ImportError as err:  # `pip install hf_camhd` without the experiments extra: the message names it
        return _error(str(err))

    try:
        cfg = CompareConfig(
            task=args.task, model=args.model, dataset=args.dataset, optimizers=args.optimizers, seeds=args.seeds,
            first_seed=args.first_seed, epochs=args.epochs, batch_size=args.batch_size,
            eval_batch_size=args.eval_batch_size, levels=args.levels, gamma=args.gamma, device=args.device,
            mixed_precision=args.mixed_precision, output_dir=args.output_dir, data_dir=args.data_dir,
            sweep_gamma=args.sweep_gamma, sweep_hypergrad_lr=args.sweep_hypergrad_lr, sweep_bases=args.bases,
            sweep_rules=args.rules, sweep_betas=args.betas, max_train_samples=args.max_train_samples,
            max_test_samples=args.max_test_samples, log_every=args.log_every, threads=args.threads, resume=args.resume,
            keep_checkpoints=args.keep_checkpoints, progress=args.progress, plots=args.plots, command="hf-camhd " + shlex.join(argv),
            push_to_hub=args.push_to_hub, hub_model_id=args.hub_model_id, hub_optimizer=args.hub_optimizer,
            hub_private=args.hub_private, hub_token=args.hub_token,
            **({"sweep_values": args.sweep_values} if args.sweep_values else {}))
        summary = run_comparison(cfg, log=print)
    except (DatasetUnavailableError, MissingDependencyError, ValueError) as err:
        return _error(str(err))
    if summary.markdown:
        print()
        print(summary.markdown)
        print(f"wrote {summary.output_dir}/results.json, results.md"
              + "".join(f", {name}" for name in summary.results.get("plots", {}))
              + f" ({len(summary.executed)} runs trained, {len(summary.skipped)} reused)")
    if summary.hub is not None and not summary.hub["pushed"]:
        return 1  # trained and written, but the upload did not happen (the message above says why)
    return 0


# ------------------------------------------------------------------------------------------------ tree
def _add_tree_parser(subparsers) -> None:
    subparsers.add_parser("tree", add_help=False,
                          help="print a model's learning-rate tree (hf_camhd.hierarchy; see hf-camhd tree --help)")


def _cmd_tree(argv: Sequence[str]) -> int:
    """Forward every argument to ``hf_camhd.hierarchy.__main__.main`` (imported only now)."""
    try:
        from .hierarchy.__main__ import main as tree_main
    except ModuleNotFoundError as err:
        if err.name and err.name.startswith("hf_camhd"):
            return _error("'hf-camhd tree' is not available in this installation (hf_camhd.hierarchy.__main__ "
                          "is missing); update hf_camhd")
        raise
    import inspect

    kwargs = {"prog": "hf-camhd tree"} if "prog" in inspect.signature(tree_main).parameters else {}
    try:
        rc = tree_main(list(argv), **kwargs)
    except SystemExit as exc:  # its argparse: --help (0) or a usage error (2)
        rc = exc.code
    return int(rc or 0)


# ------------------------------------------------------------------------------------------------ main
#: subcommand -> (add its parser, pass-through handler or None). A pass-through handler gets the raw
#: arguments after the subcommand and parses them itself (``tree``); the others are parsed here.
SUBCOMMANDS: dict[str, tuple[Callable, Callable[[Sequence[str]], int] | None]] = {
    "compare": (_add_compare_parser, None),
    "tree": (_add_tree_parser, _cmd_tree),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="hf-camhd", description="CAM-HD optimizers for the Hugging Face stack.")
    parser.add_argument("--version", action="version", version=f"hf_camhd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for add, _ in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-camhd``; returns the exit status (0 ok, 2 usage error / missing dataset)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS and SUBCOMMANDS[argv[0]][1] is not None:
        return SUBCOMMANDS[argv[0]][1](argv[1:])
    parser = build_parser()
    if not argv:
        parser.print_help()
        return 2
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2)
        return int(exc.code or 0)
    return args.handler(args, argv)


if __name__ == "__main__":
    sys.exit(main())
