#!/usr/bin/env python
"""Fine-tune a transformers model for text classification with a CAM-HD optimizer in ``transformers.Trainer``.

The optimizer comes from :class:`hf_camhd.integrations.transformers.CAMHDOptimizerFactory` (the hierarchy —
embeddings / each transformer layer / head — is built from the model, with the Trainer's weight-decay
split); :class:`~hf_camhd.integrations.transformers.CAMHDTrainer` (a ``Trainer``) puts γ and the α
statistics into every training log (``log_history``, TensorBoard, ...) and writes a model card that names
the CAM-HD optimizer, its settings and the learned rates. ``--push_to_hub --hub_model_id user/name``
uploads the result with the Trainer's own ``push_to_hub`` (one commit); without a token or network it
says so and leaves ``OUTPUT_DIR`` in place.

Real run (one process: CPU or one GPU)::

    python scripts/finetune_transformer.py --model_name_or_path bert-base-uncased --dataset_name imdb \\
        --optimizer adamw-camhd --levels global,block,layer --lr 2e-5 --hypergrad_lr 1e-9 --gamma_lr 0.01 \\
        --num_train_epochs 2 --per_device_train_batch_size 32 --bf16 --output_dir runs/bert-imdb

N GPUs (DDP; the batch size is per device)::

    torchrun --nproc_per_node N scripts/finetune_transformer.py ...same arguments...
    accelerate launch --multi_gpu --num_processes N scripts/finetune_transformer.py ...same arguments...

Offline smoke run (a tiny BERT config, a tokenizer built from a generated vocabulary and a synthetic
sentiment dataset; nothing is downloaded)::

    python scripts/finetune_transformer.py --tiny --max_steps 30 --output_dir runs/tiny

Local data: ``--train_file train.csv --validation_file dev.csv`` (csv / json / parquet, with ``--text_column``
and ``--label_column``). ``--resume_from_checkpoint PATH|latest`` continues a run exactly (weights and
optimizer state bitwise on CPU). ``latest`` takes the newest checkpoint whose save finished — one a kill
interrupted is removed, with a note — and with no checkpoint yet starts from the beginning, so one command
line serves the first start and every restart. A damaged checkpoint is one clear error naming the file. At
the end ``OUTPUT_DIR`` holds the model, ``README.md`` (the card) and ``metrics.json`` (train / eval metrics
and the learned rates; the Trainer's ``train`` metrics — ``train_loss``, runtime, speed — cover the steps
of the last call only, so after a resume they describe the resumed part; ``log_history`` has every step).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_name_or_path", help="a Hub model id or a local folder")
    src.add_argument("--tiny", action="store_true",
                     help="offline: tiny BERT config + generated tokenizer + synthetic data")
    g.add_argument("--dataset_name", default=None, help="a `datasets` dataset (Hub id or local path), e.g. imdb")
    g.add_argument("--dataset_config", default=None)
    g.add_argument("--train_file", default=None, help="local csv / json / parquet training file")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--text_column", default="text")
    g.add_argument("--text_pair_column", default=None, help="second text column for sentence-pair tasks")
    g.add_argument("--label_column", default="label")
    g.add_argument("--max_length", type=int, default=128)
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g = p.add_argument_group("optimizer (CAM-HD)")
    g.add_argument("--optimizer", default="adamw-camhd", help="an hf_camhd optimizer name (default adamw-camhd)")
    g.add_argument("--levels", default="global,block,layer")
    g.add_argument("--lr", type=float, default=5e-5, help="α₀")
    g.add_argument("--weight_decay", type=float, default=0.01, help="no decay for biases and norms")
    g.add_argument("--hypergrad_lr", type=float, default=None, help="β (default: the optimizer's)")
    g.add_argument("--gamma_lr", type=float, default=None, help="δ (default: the optimizer's)")
    g.add_argument("--gamma", default=None, help="initial γ, one per level, e.g. 0.4,0.3,0.3")
    g.add_argument("--decay_rate", type=float, default=None)
    g = p.add_argument_group("training (transformers.TrainingArguments)")
    g.add_argument("--output_dir", default="runs/finetune")
    g.add_argument("--num_train_epochs", type=float, default=3.0)
    g.add_argument("--max_steps", type=int, default=-1)
    g.add_argument("--per_device_train_batch_size", type=int, default=16)
    g.add_argument("--per_device_eval_batch_size", type=int, default=64)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--lr_scheduler_type", default="linear", help="a multiplier on the learned rates")
    g.add_argument("--warmup_steps", type=float, default=0.0, help="steps, or a ratio of the total in [0, 1)")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--save_steps", type=int, default=500)
    g.add_argument("--eval_strategy", default="epoch", choices=("no", "steps", "epoch"))
    g.add_argument("--eval_steps", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest'")
    g.add_argument("--report_to", default="none", help="tensorboard, wandb, ... (default none)")
    g.add_argument("--push_to_hub", action="store_true", help="upload OUTPUT_DIR to --hub_model_id at the end")
    g.add_argument("--hub_model_id", default=None, help="user/name of the Hub repo")
    g.add_argument("--hub_private_repo", action="store_true")
    g.add_argument("--hub_token", default=None, help="default: the token of `hf auth login`")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--use_cpu", action="store_true")
    g.add_argument("--disable_tqdm", action="store_true")
    args = p.parse_args(argv)
    if args.push_to_hub and not args.hub_model_id:
        p.error("--push_to_hub needs --hub_model_id user/name")
    if args.push_to_hub:
        from hf_camhd.hub import check_repo_id

        try:
            check_repo_id(args.hub_model_id, flag="--hub_model_id")
        except ValueError as err:  # before any training, not after it
            p.error(str(err))
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        p.error(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder; pass a checkpoint folder "
                "(OUTPUT_DIR/checkpoint-<step>) or latest")
    return args


# ------------------------------------------------------------------------------------------ tiny offline setup
_POS = ["good", "great", "excellent", "lovely", "superb", "wonderful", "fine", "brilliant"]
_NEG = ["bad", "awful", "terrible", "poor", "boring", "dreadful", "weak", "horrible"]
_FILL = ["the", "a", "movie", "film", "plot", "actor", "was", "is", "very", "quite", "story", "and", "it", "this",
         "scene", "ending", "music", "really", "not", "so"]


def synthetic_sentiment(n: int, seed: int):
    """``n`` short "reviews" whose label is the majority sentiment of their sentiment words."""
    import datasets

    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(_FILL) for _ in range(rng.randint(4, 9))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(_POS if label else _NEG))
        texts.append(" ".join(words))
        labels.append(label)
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def tiny_model_and_tokenizer(folder: Path, num_labels: int, id2label: dict):
    """A 2-layer BERT config and a WordPiece tokenizer over the synthetic vocabulary, built offline."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from hf_camhd.files import atomic_write

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(_POS + _NEG + _FILL))]
    atomic_write(folder / "vocab.txt", "\n".join(vocab) + "\n")
    # note: from the folder, which every transformers release reads (transformers 5 ignores `vocab_file=`, and a
    # tokenizer built that way maps every word to [UNK])
    tokenizer = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        id2label=id2label, label2id={v: k for k, v in id2label.items()})
    return BertForSequenceClassification(config), tokenizer


# ------------------------------------------------------------------------------------------ data
def load_data(args):
    import datasets

    if args.tiny and not (args.dataset_name or args.train_file):
        return datasets.DatasetDict({"train": synthetic_sentiment(512, args.seed),
                                     "validation": synthetic_sentiment(128, args.seed + 1)})
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config)
    elif args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        ext = Path(args.train_file).suffix.lstrip(".").replace("jsonl", "json")
        raw = datasets.load_dataset(ext, data_files=files)
    else:
        raise SystemExit("Give --dataset_name or --train_file (or --tiny for the synthetic data)")
    if "validation" not in raw:
        for name in ("test", "dev"):
            if name in raw:
                raw["validation"] = raw[name]
                break
        else:
            split = raw["train"].train_test_split(test_size=0.1, seed=args.seed)
            raw = datasets.DatasetDict({"train": split["train"], "validation": split["test"]})
    return raw


def label_names(train) -> list[str]:
    import datasets

    feature = train.features[LABEL]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(v) for v in sorted(set(train[LABEL]))]


LABEL = "label"


def build_compute_metrics(num_labels: int):
    """The Trainer's ``compute_metrics``, built on ``evaluate`` as the transformers examples build it: accuracy, F1
    (binary with two labels, macro otherwise) and Matthews correlation, from the evaluate modules shipped in
    :mod:`hf_camhd.metrics` (``evaluate.load`` of a local module: no network). The Trainer logs them as
    ``eval_accuracy``, ``eval_f1``, ``eval_matthews_correlation``."""
    from hf_camhd import metrics

    accuracy, f1, mcc = (metrics.load(name) for name in ("accuracy", "f1", "matthews_correlation"))
    average = "binary" if num_labels == 2 else "macro"

    def compute_metrics(eval_pred) -> dict:
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.argmax(logits, axis=-1)
        return {**accuracy.compute(predictions=predictions, references=labels),
                **f1.compute(predictions=predictions, references=labels, average=average),
                **mcc.compute(predictions=predictions, references=labels)}

    return compute_metrics


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    global LABEL
    args = parse_args(argv)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, TrainingArguments, set_seed

    from hf_camhd.files import atomic_write_json
    from hf_camhd.integrations.transformers import (
        CAMHDOptimizerFactory,
        CAMHDTrainer,
        check_trainer_checkpoint,
        latest_complete_checkpoint,
        unwrap_camhd,
    )

    set_seed(args.seed)
    LABEL = args.label_column
    output_dir = Path(args.output_dir)
    raw = load_data(args)
    names = label_names(raw["train"])
    id2label = dict(enumerate(names))
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer(output_dir / "tiny_tokenizer", len(names), id2label)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path, num_labels=len(names), id2label=id2label,
            label2id={v: k for k, v in id2label.items()})

    to_index = {n: i for i, n in enumerate(names)}

    def tokenize(batch):
        texts = (batch[args.text_column],) if args.text_pair_column is None else \
            (batch[args.text_column], batch[args.text_pair_column])
        enc = tokenizer(*texts, truncation=True, max_length=args.max_length)
        labels = batch[LABEL]
        enc["labels"] = [v if isinstance(v, int) else to_index[str(v)] for v in labels]
        return enc

    data = {}
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        data[split] = ds.map(tokenize, batched=True, remove_columns=ds.column_names)

    optim_kwargs = {"optimizer": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
                    "levels": tuple(s.strip() for s in args.levels.split(",") if s.strip())}
    for key in ("hypergrad_lr", "gamma_lr", "decay_rate"):
        if getattr(args, key) is not None:
            optim_kwargs[key] = getattr(args, key)
    if args.gamma:
        optim_kwargs["gamma"] = [float(x) for x in args.gamma.split(",")]
    training_args = TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=args.num_train_epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.lr,
        weight_decay=args.weight_decay, lr_scheduler_type=args.lr_scheduler_type, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm, bf16=args.bf16, fp16=args.fp16, logging_steps=args.logging_steps,
        save_steps=args.save_steps, eval_strategy=args.eval_strategy, eval_steps=args.eval_steps,
        report_to=args.report_to, seed=args.seed, use_cpu=args.use_cpu, disable_tqdm=args.disable_tqdm,
        hub_model_id=args.hub_model_id, hub_private_repo=args.hub_private_repo, hub_token=args.hub_token)
    # note: CAMHDTrainer logs the CAM-HD scalars itself (before every reporting integration) and cards the optimizer
    trainer = CAMHDTrainer(model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
                           processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                           compute_metrics=build_compute_metrics(len(names)),
                           optimizer_cls_and_kwargs=(CAMHDOptimizerFactory, optim_kwargs))

    resume = args.resume_from_checkpoint
    say = print if trainer.is_world_process_zero() else None
    if resume == "latest":
        resume = latest_complete_checkpoint(output_dir, log=say)
        if resume is None and say is not None:
            say(f"--resume_from_checkpoint latest: no checkpoint in {output_dir} yet; starting from the beginning")
    if resume is not None:
        check_trainer_checkpoint(resume)  # note: a damaged file is one message naming it, not a torch traceback
    train_result = trainer.train(resume_from_checkpoint=resume)
    eval_metrics = trainer.evaluate() if args.eval_strategy != "no" else {}
    trainer.save_model()
    opt = unwrap_camhd(trainer.optimizer)
    result = {"train": train_result.metrics, "eval": eval_metrics, "global_step": trainer.state.global_step,
              "optimizer": args.optimizer, "levels": list(opt.levels) if opt else [],
              "camhd": opt.lr_stats() if opt else {},
              "log_history": trainer.state.log_history}
    card_kw = dict(finetuned_from=None if args.tiny else args.model_name_or_path, dataset=args.dataset_name)
    if trainer.is_world_process_zero():
        trainer.create_model_card(model_name=args.hub_model_id.split("/")[-1] if args.hub_model_id else output_dir.name,
                                  **card_kw)
        atomic_write_json(output_dir / "metrics.json", result, default=str)
    if args.push_to_hub:
        result["hub"] = push(trainer, card_kw)
    return result


def push(trainer, card_kw: dict) -> dict:
    """The Trainer's own ``push_to_hub`` (our card, one commit); a failure is a message, not a traceback."""
    try:
        commit = trainer.push_to_hub(commit_message="Fine-tuned with a CAM-HD optimizer (hf_camhd)", **card_kw)
    except Exception as err:  # no token, no network, refused: say so and keep the folder
        msg = (f"push_to_hub to {trainer.args.hub_model_id!r} failed ({type(err).__name__}: {err}). "
               f"The model, card and metrics are in {trainer.args.output_dir}; upload later with "
               f"`hf upload {trainer.args.hub_model_id} {trainer.args.output_dir}`.")
        print(msg, file=sys.stderr)
        return {"pushed": False, "error": msg}
    return {"pushed": True, "commit": str(getattr(commit, "commit_url", commit))}


if __name__ == "__main__":
    from hf_camhd.files import CorruptFileError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        sys.exit(0 if main() else 1)
    except CorruptFileError as err:  # a damaged checkpoint: one message naming the file, no traceback
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
