#!/usr/bin/env python
"""Train an image classifier with a CAM-HD optimizer under ``accelerate`` (1 CPU, 1 GPU or N GPUs, unchanged).

Models: ``lenet5`` / ``mlp`` (:mod:`hf_camhd.models`) or any timm model as ``timm:<name>`` (e.g.
``timm:resnet18``, built from scratch). Data: a ``datasets`` dataset through
:func:`hf_camhd.data.load_image_dataset` (``digits`` works offline; ``fashion_mnist`` offline with the Debian
package ``dataset-fashion-mnist``; ``mnist`` / ``cifar10`` / ``svhn`` from the Hub or ``--data_dir``).

One process (CPU or one GPU)::

    python scripts/train_image_classifier.py --model lenet5 --dataset digits \\
        --optimizer adam-camhd --levels global,block,layer --lr 1e-3 --gamma_lr 0.03 \\
        --epochs 5 --output_dir runs/lenet5-digits
    accelerate launch --num_processes 1 scripts/train_image_classifier.py ...    # same, via accelerate

N GPUs (DDP; the batch size is per device) / bf16::

    accelerate launch --multi_gpu --num_processes N scripts/train_image_classifier.py ... --mixed_precision bf16
    torchrun --nproc_per_node N scripts/train_image_classifier.py ...

Checkpoints: ``--checkpointing_steps K`` saves ``OUTPUT_DIR/checkpoints/step_<k>`` (``accelerator.save_state``);
``--resume_from_checkpoint PATH|latest`` continues exactly where it stopped (the batch order is a function
of the seed and the epoch), bitwise on CPU. ``latest`` with no checkpoint yet starts from the beginning, so
one command line serves the first start and every restart of a preemptible job. At the end
``OUTPUT_DIR/metrics.json`` holds the final evaluation, the per-epoch history and the learned rates (γ per
level, α statistics), and ``OUTPUT_DIR/model`` the weights.

Every folder and file is written atomically (a temporary sibling, renamed into place once complete), so a
run killed at any moment leaves the previous checkpoint intact; what the kill left half-written is removed
at the next start, and a truncated or corrupted checkpoint is one clear error naming the file.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch
from torch import nn


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="lenet5", help="lenet5, mlp or timm:<name> (default lenet5)")
    g.add_argument("--hidden_sizes", default="100,100,100", help="MLP widths (default 100,100,100)")
    g.add_argument("--dataset", default="digits", help="digits, mnist, fashion_mnist, cifar10, svhn (default digits)")
    g.add_argument("--data_dir", default=None, help="local copy of the dataset (see hf_camhd.data.load_image_dataset)")
    g.add_argument("--max_samples", type=int, default=None, help="keep only the first N examples of each split")
    g.add_argument("--no_hub", action="store_true", help="never try the Hugging Face Hub")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="adam-camhd",
                   help="a CAM-HD name (hf_camhd.list_optimizers(): adam-camhd, sgdn-camhd, adam-hd, ...) or a "
                        "torch baseline: adam, adamw, sgd, sgdn (default adam-camhd)")
    g.add_argument("--levels", default="global,block,layer", help="CAM-HD levels, coarse to fine")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (sgd*, sgdn*)")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--hypergrad_lr", type=float, default=None, help="β (default: the optimizer's)")
    g.add_argument("--gamma_lr", type=float, default=None, help="δ (default: the optimizer's)")
    g.add_argument("--gamma", default=None, help="initial γ, one per level, e.g. 0.2,0.8")
    g.add_argument("--decay_rate", type=float, default=None, help="r of τ(t) = exp(−r t)")
    g.add_argument("--hypergrad_scaling", choices=("equal", "sum"), default=None)
    g.add_argument("--lr_schedule", choices=("constant", "cosine"), default="constant",
                   help="scheduler multiplier on the (learned) rates")
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=128, help="per device")
    g.add_argument("--eval_batch_size", type=int, default=512)
    g.add_argument("--epochs", type=int, default=5)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=None,
                   help="clip the gradient norm (accelerator.clip_grad_norm_)")
    g.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default=None,
                   help="default: from `accelerate launch` / the accelerate config")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is there")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output_dir", default="runs/image-classifier")
    g.add_argument("--checkpointing_steps", type=int, default=None, help="save the state every K optimizer steps")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--log_every", type=int, default=20, help="log loss and CAM-HD scalars every K steps")
    g.add_argument("--report_to", default=None, help="accelerate trackers, e.g. tensorboard (default: none)")
    g.add_argument("--no_progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--push_to_hub", action="store_true",
                   help="write a Hub-ready folder (OUTPUT_DIR/hub: weights, CAM-HD card, plots) and upload it")
    g.add_argument("--hub_model_id", default=None, help="user/name of the Hub repo (needed with --push_to_hub)")
    g.add_argument("--hub_private_repo", action="store_true")
    g.add_argument("--hub_token", default=None, help="default: the token of `hf auth login`")
    args = p.parse_args(argv)
    if args.gradient_accumulation_steps < 1:
        p.error("--gradient_accumulation_steps must be >= 1")
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        p.error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder; pass a checkpoint folder "
                "(OUTPUT_DIR/checkpoints/step_<k>) or latest")
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id user/name")
    if args.push_to_hub:
        from hf_camhd.hub import check_repo_id

        try:
            check_repo_id(args.hub_model_id, flag="--hub_model_id")
        except ValueError as err:  # before any training, not after it
            p.error(str(err))
    return args


# ------------------------------------------------------------------------------------------ building blocks
def build_model(args, info) -> nn.Module:
    num_classes = len(info.class_names)
    if args.model == "lenet5":
        from hf_camhd.models import LeNet5
        return LeNet5(in_channels=info.num_channels, image_size=info.image_size, num_classes=num_classes)
    if args.model == "mlp":
        from hf_camhd.models import MLP
        hidden = [int(x) for x in args.hidden_sizes.split(",") if x.strip()]
        return MLP(input_size=info.num_channels * info.image_size ** 2, hidden_sizes=hidden, num_classes=num_classes)
    if args.model.startswith("timm:"):
        import timm
        return timm.create_model(args.model[5:], pretrained=False, num_classes=num_classes, in_chans=info.num_channels)
    raise SystemExit(f"Unknown --model {args.model!r}; expected lenet5, mlp or timm:<name>")


_TORCH_BASELINES = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                    "sgdn": torch.optim.SGD}


def build_optimizer(args, model: nn.Module) -> torch.optim.Optimizer:
    name = args.optimizer.lower()
    if name in _TORCH_BASELINES:
        kw = dict(lr=args.lr, weight_decay=args.weight_decay)
        if name.startswith("sgd"):
            kw.update(momentum=args.momentum, nesterov=name == "sgdn")
        return _TORCH_BASELINES[name](model.parameters(), **kw)
    from hf_camhd import create_optimizer
    from hf_camhd.optim import get_optimizer_info

    info = get_optimizer_info(name)
    kw = dict(lr=args.lr, weight_decay=args.weight_decay)
    if "levels" not in info.fixed:
        kw["levels"] = tuple(s.strip() for s in args.levels.split(",") if s.strip())
    if info.cls.__name__ == "CAMHDSGD":
        kw["momentum"] = args.momentum
    for key in ("hypergrad_lr", "gamma_lr", "decay_rate", "hypergrad_scaling"):
        if getattr(args, key) is not None:
            kw[key] = getattr(args, key)
    if args.gamma:
        kw["gamma"] = [float(x) for x in args.gamma.split(",")]
    return create_optimizer(model, name, **kw)


def logits_of(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


_RESUME_FIX = ("Delete that checkpoint folder (--resume_from_checkpoint latest then takes the one before it), or "
               "start over without --resume_from_checkpoint.")


def find_checkpoint(output_dir: Path, wanted: str, log=print) -> Path | None:
    """The checkpoint folder to resume from (``None``: ``latest`` and there is none yet). A ``step_<k>``
    folder without ``progress.json`` (written last) is skipped with a note: an older version of this script
    was killed while saving it."""
    if wanted != "latest":
        return Path(wanted)
    found = sorted((int(m.group(1)), d) for d in (output_dir / "checkpoints").glob("step_*")
                   if (m := re.fullmatch(r"step_(\d+)", d.name)) and d.is_dir())
    for _, d in reversed(found):
        if (d / "progress.json").is_file():
            return d
        log(f"note: skipping {d}: it has no progress.json (its save was interrupted)")
    log(f"--resume_from_checkpoint latest: no checkpoint under {output_dir / 'checkpoints'} yet; starting from "
        "the beginning")
    return None


def save_folder(accelerator, folder: Path, write) -> Path:
    """Write ``folder`` atomically from every process: ``write(tmp)`` fills a temporary sibling (all
    processes, e.g. ``accelerator.save_state``), then the main process renames it into place."""
    from hf_camhd.files import commit_dir, partial_path

    tmp = partial_path(folder)  # note: deterministic, so that every process writes into the same folder
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit_dir(tmp, folder)
    accelerator.wait_for_everyone()
    return folder


@torch.no_grad()
def evaluate(accelerator, model, loader, metric) -> dict:
    """Accuracy (``metric``: the evaluate module of :mod:`hf_camhd.metrics`), mean loss and the number of examples
    over the whole eval split, gathered over processes."""
    model.eval()
    total = 0
    loss_sum = 0.0
    for batch in loader:
        logits = logits_of(model(batch["pixel_values"])).float()
        loss = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")  # per example: gathered
        preds, labels, loss = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
        metric.add_batch(predictions=preds.cpu().numpy(), references=labels.cpu().numpy())
        total += int(labels.numel())
        loss_sum += float(loss.sum())
    model.train()
    return {**metric.compute(), "loss": loss_sum / max(total, 1), "examples": total}


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    args = parse_args(argv)
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from hf_camhd import metrics
    from hf_camhd.data import as_dataloader, dataset_info, load_image_dataset, train_transform
    from hf_camhd.files import atomic_write_json, check_files, read_json, recover_leftovers
    from hf_camhd.integrations.accelerate import camhd_stats, check_accelerator, log_camhd_stats

    output_dir = Path(args.output_dir)
    # note: several processes on a machine without a GPU must be told to use the CPU (gloo), or accelerate
    # runs them as independent single-process trainings
    cpu = args.cpu or (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=cpu,
                              gradient_accumulation_steps=args.gradient_accumulation_steps,
                              log_with=args.report_to, project_dir=str(output_dir),
                              # note: a shuffle order that depends only on (seed, epoch), so a resumed run
                              # sees the same batches as an uninterrupted one
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    check_accelerator(accelerator)
    if accelerator.is_main_process:
        for folder in (output_dir, output_dir / "checkpoints"):
            recover_leftovers(folder, log=lambda line: print(f"note: {line}"))
    accelerator.wait_for_everyone()
    set_seed(args.seed)
    info = dataset_info(args.dataset)
    with accelerator.main_process_first():
        ds = load_image_dataset(args.dataset, data_dir=args.data_dir, max_samples=args.max_samples, seed=args.seed,
                                use_hub=not args.no_hub)
    train_loader = as_dataloader(ds["train"], args.batch_size, shuffle=True, seed=args.seed,
                                 transform=train_transform(args.dataset))
    eval_loader = as_dataloader(ds["test"], args.eval_batch_size)
    model = build_model(args, info)
    optimizer = build_optimizer(args, model)
    accuracy = metrics.load("accuracy")

    # note: the prepared scheduler steps once per process per optimizer step (accelerate's convention), so the
    # schedule's horizon is total_steps * num_processes; it is known once the loader is sharded
    horizon = {"steps": 1}

    def schedule(step: int) -> float:
        if args.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, horizon["steps"]) / horizon["steps"]))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer, train_loader, eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, scheduler)
    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)  # per process
    total_steps = args.max_steps or steps_per_epoch * args.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    horizon["steps"] = total_steps * accelerator.num_processes
    if args.report_to:
        accelerator.init_trackers("camhd", config={k: v for k, v in vars(args).items()
                                                   if isinstance(v, (int, float, str, bool))})

    global_step, history, gamma_trajectory = 0, [], []
    ckpt = find_checkpoint(output_dir, args.resume_from_checkpoint, accelerator.print) \
        if args.resume_from_checkpoint else None
    if ckpt is not None:
        # note: every file is checked before accelerate reads any, so damage is one message naming the file
        check_files(ckpt, required=("progress.json", "model*.safetensors", "optimizer*.bin", "random_states_*.pkl"),
                    fix=_RESUME_FIX)
        accelerator.load_state(str(ckpt))
        state = read_json(ckpt / "progress.json", fix=_RESUME_FIX, what="Checkpoint file")
        global_step, history = state["global_step"], state["history"]
        gamma_trajectory = state.get("gamma_trajectory", [])
        accelerator.print(f"resumed from {ckpt} at step {global_step}")
        if ((global_step % steps_per_epoch == 0 or global_step >= total_steps)
                and (not history or history[-1]["step"] != global_step)):
            # saved at the end of an epoch (or of training), before its evaluation: evaluate now, as the
            # uninterrupted run did
            metrics = evaluate(accelerator, model, eval_loader, accuracy)
            metrics.update(epoch=math.ceil(global_step / steps_per_epoch), step=global_step,
                           train_loss=state["train_loss"])
            history.append(metrics)

    def save_checkpoint():
        def write(tmp: Path) -> None:
            accelerator.save_state(str(tmp))
            if accelerator.is_main_process:  # note: written last: a step_<k> folder without it is incomplete
                atomic_write_json(tmp / "progress.json", {"global_step": global_step, "history": history,
                                                          "train_loss": last_loss,
                                                          "gamma_trajectory": gamma_trajectory})

        save_folder(accelerator, output_dir / "checkpoints" / f"step_{global_step}", write)

    bar = tqdm(total=total_steps, initial=global_step, desc="train",
               disable=args.no_progress or not accelerator.is_local_main_process)
    model.train()
    last_loss = state["train_loss"] if ckpt is not None else float("nan")
    start_epoch = global_step // steps_per_epoch
    for epoch in range(start_epoch, epochs):
        if global_step >= total_steps:  # resumed from the last checkpoint: nothing left to train
            break
        train_loader.set_epoch(epoch)
        loader = train_loader
        done_in_epoch = global_step - epoch * steps_per_epoch
        if done_in_epoch > 0:  # resuming mid-epoch: skip the micro-batches already consumed
            loader = accelerator.skip_first_batches(train_loader, done_in_epoch * args.gradient_accumulation_steps)
        for batch in loader:
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    logits = logits_of(model(batch["pixel_values"]))
                loss = nn.functional.cross_entropy(logits.float(), batch["labels"])
                accelerator.backward(loss)
                if args.max_grad_norm is not None and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            last_loss = float(loss.detach())
            bar.update(1)
            if global_step % args.log_every == 0 or global_step == total_steps:
                stats = log_camhd_stats(accelerator, optimizer, step=global_step) if args.report_to else \
                    camhd_stats(optimizer)
                gamma_trajectory.append({"step": global_step, **{k[len("camhd/gamma_"):]: v for k, v in stats.items()
                                                                 if k.startswith("camhd/gamma_")}})
                accelerator.log({"train/loss": last_loss}, step=global_step)
                bar.set_postfix(loss=f"{last_loss:.4f}",
                                lr=f"{stats.get('camhd/effective_lr_mean', scheduler.get_last_lr()[0]):.2e}")
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                save_checkpoint()
            if global_step >= total_steps:
                break
        metrics = evaluate(accelerator, model, eval_loader, accuracy)
        metrics.update(epoch=epoch + 1, step=global_step, train_loss=last_loss)
        history.append(metrics)
        accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=global_step)
        accelerator.print(f"epoch {epoch + 1}: eval accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}")
        if global_step >= total_steps:
            break
    bar.close()

    stats = camhd_stats(optimizer)
    result = {"model": args.model, "dataset": args.dataset, "optimizer": args.optimizer,
              "levels": list(getattr(getattr(optimizer, "optimizer", optimizer), "levels", ())),
              "global_step": global_step, "epochs": len(history), "num_processes": accelerator.num_processes,
              "mixed_precision": accelerator.mixed_precision, "final_eval": history[-1] if history else None,
              "history": history, "camhd": stats, "args": vars(args)}
    save_folder(accelerator, output_dir / "model", lambda tmp: accelerator.save_model(model, str(tmp)))
    if accelerator.is_main_process:
        if args.push_to_hub:
            result["hub"] = publish_run(args, info, accelerator.unwrap_model(model), optimizer, history,
                                        gamma_trajectory, output_dir)
        atomic_write_json(output_dir / "metrics.json", result)
    accelerator.end_training()
    return result


def publish_run(args, info, model, optimizer, history, gamma_trajectory, output_dir: Path) -> dict:
    """Write OUTPUT_DIR/hub (weights in the model's Hub format, CAM-HD card, plots) and upload it; a failed
    upload is one clear message and the folder stays."""
    from hf_camhd.hub import HubUploadError, publish, training_plots

    final = history[-1] if history else {}
    plots = training_plots(history, gamma_trajectory, output_dir / "plots")
    folder = output_dir / "hub"
    try:
        publish(model, folder, results={k: final[k] for k in ("accuracy", "loss") if math.isfinite(final.get(k, math.nan))},
                optimizer=getattr(optimizer, "optimizer", optimizer),
                dataset={"name": args.dataset, "id": info.hub_id}, plots=plots, push=True, repo_id=args.hub_model_id,
                private=args.hub_private_repo, token=args.hub_token)
    except (HubUploadError, ValueError) as err:  # e.g. no evaluation to publish: the trained run is kept either way
        print(str(err), file=sys.stderr)
        return {"pushed": False, "folder": str(folder), "error": str(err)}
    return {"pushed": True, "folder": str(folder), "repo_id": args.hub_model_id}


if __name__ == "__main__":
    from hf_camhd.files import CorruptFileError

    try:
        sys.exit(0 if main() else 1)
    except CorruptFileError as err:  # a damaged checkpoint: one message naming the file, no traceback
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
