"""CAM-HD in transformers.Trainer: factory and optimizers= paths, logging, exact resume, model card.

A tiny BERT-config classifier (built from a config: nothing is downloaded) on a synthetic tokenized dataset.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
from transformers import (BertConfig, BertForSequenceClassification, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)
from transformers.trainer_optimizer import is_optimizer_factory  # noqa: E402

from hf_camhd import CAMHDAdam, CAMHDAdamW  # noqa: E402
from hf_camhd.integrations import unwrap_camhd  # noqa: E402
from hf_camhd.integrations.transformers import (CAMHDCallback, CAMHDOptimizerFactory, CAMHDTrainer,  # noqa: E402
                                                camhd_optimizer_description)

CAMHD_KEYS = {"camhd/gamma_global", "camhd/gamma_block", "camhd/gamma_layer", "camhd/alpha_layer_mean",
              "camhd/alpha_layer_min", "camhd/alpha_layer_max", "camhd/alpha_block_mean", "camhd/effective_lr_mean"}
FACTORY_KW = {"optimizer": "adamw-camhd", "lr": 2e-3, "weight_decay": 0.01, "levels": ("global", "block", "layer"),
              "hypergrad_lr": 1e-5, "gamma_lr": 0.2}


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dataset():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 64, (64, 8), generator=g)
    labels = (ids[:, 1] > 34).long()
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist(),
                                       "labels": labels.tolist()})


def _args(out, **kw) -> TrainingArguments:
    base = dict(per_device_train_batch_size=8, max_steps=6, logging_steps=2, save_strategy="no", report_to=[],
                use_cpu=True, seed=0, disable_tqdm=True)
    return TrainingArguments(str(out), **{**base, **kw})


def _camhd_logs(trainer) -> list[dict]:
    return [e for e in trainer.state.log_history if "loss" in e]


class Recorder(TrainerCallback):
    """Stands in for a reporting integration (TensorBoard, W&B): records the logs it is given."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def test_factory_is_a_trainer_factory():
    assert is_optimizer_factory(CAMHDOptimizerFactory)
    opt = CAMHDOptimizerFactory()(tiny_bert(), **FACTORY_KW)
    assert isinstance(opt, CAMHDAdamW)
    # without weight_decay: AdamW's default decay, still off biases and norms
    opt = CAMHDOptimizerFactory()(tiny_bert(), optimizer="adamw-camhd")
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 0.0]
    opt = CAMHDOptimizerFactory()(tiny_bert(), optimizer="adam-camhd")  # Adam: no decay, one group
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0]


def test_factory_path_trains_with_the_trainers_decay_split_and_logs(tmp_path, dataset):
    model = tiny_bert()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=dataset,
                      optimizer_cls_and_kwargs=(CAMHDOptimizerFactory, FACTORY_KW), callbacks=[CAMHDCallback()])
    trainer.train()
    opt = unwrap_camhd(trainer.optimizer)
    assert isinstance(opt, CAMHDAdamW) and opt.levels == ("global", "block", "layer")
    assert opt.tree.node_names("block") == ["stem", "bert.encoder.layer.0", "bert.encoder.layer.1", "head"]
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert not any("bias" in n or "LayerNorm" in n for n in decay["param_names"])
    assert any(n.endswith("LayerNorm.weight") for n in no_decay["param_names"])
    assert set(decay["param_names"]) == set(trainer.get_decay_parameter_names(model)) & {
        n for n, p in model.named_parameters() if p.requires_grad}
    logs = _camhd_logs(trainer)
    assert len(logs) == 3
    for e in logs:
        assert CAMHD_KEYS <= e.keys()
        assert sum(e[f"camhd/gamma_{lv}"] for lv in opt.levels) == pytest.approx(1.0, abs=1e-6)
    # the logged values are the optimizer's at that step; the last one is the final state
    assert logs[-1]["camhd/gamma_block"] == pytest.approx(float(opt.gamma[1]), abs=1e-7)
    assert logs[-1]["camhd/alpha_layer_max"] == pytest.approx(float(opt.alpha("layer").max()), rel=1e-6)
    assert logs[0]["camhd/alpha_layer_max"] != logs[-1]["camhd/alpha_layer_max"]  # the rates adapt


def test_optimizers_path_and_callback_installed_first_reaches_reporting_callbacks(tmp_path, dataset):
    model = tiny_bert()
    opt = CAMHDAdam(model, lr=2e-3, levels=("global", "block", "layer", "unit"), hypergrad_lr=1e-5, hypergrad_rule="additive")
    recorder = Recorder()
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=dataset, optimizers=(opt, None),
                      callbacks=[recorder])
    CAMHDCallback.install(trainer)
    assert isinstance(trainer.callback_handler.callbacks[0], CAMHDCallback)
    trainer.train()
    assert unwrap_camhd(trainer.optimizer) is opt and opt.num_steps == 6
    seen = [e for e in recorder.logs if "loss" in e]
    assert len(seen) == 3 and all({"camhd/gamma_unit", "camhd/alpha_unit_max"} <= e.keys() for e in seen)
    assert all("camhd/alpha_unit_mean" in e for e in _camhd_logs(trainer))
    # the Trainer's linear schedule reaches the optimizer as a multiplier; the learned rates stay in the state
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert opt.param_groups[0]["camhd_lr"] == 2e-3


def test_camhd_trainer_logs_and_writes_a_card_that_names_the_optimizer(tmp_path, dataset):
    recorder = Recorder()
    trainer = CAMHDTrainer(model=tiny_bert(), args=_args(tmp_path, learning_rate=3e-3, weight_decay=0.05),
                           train_dataset=dataset, camhd_optimizer="adamw-camhd",
                           camhd_kwargs={"levels": ("global", "layer"), "hypergrad_lr": 1e-5, "gamma_lr": 0.1},
                           callbacks=[recorder])
    trainer.train()
    opt = unwrap_camhd(trainer.optimizer)
    assert isinstance(opt, CAMHDAdamW) and opt.config.lr == 3e-3  # lr and decay from TrainingArguments
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    assert all("camhd/gamma_layer" in e for e in _camhd_logs(trainer))
    assert all("camhd/gamma_layer" in e for e in recorder.logs if "loss" in e)  # reporting callbacks too
    trainer.create_model_card(model_name="tiny-bert-camhd")
    card = open(os.path.join(tmp_path, "README.md"), encoding="utf-8").read()
    line = next(ln for ln in card.splitlines() if ln.startswith("- optimizer:"))
    assert "CAMHDAdamW" in line and "levels=global,layer" in line and "hypergrad_lr (β)=1e-05" in line
    assert "gamma_lr (δ)=0.1" in line and "learned γ after 6 steps" in line
    assert "adamw_torch" not in card and "- camhd" in card
    assert line.endswith(str([round(x, 4) for x in opt.gamma.tolist()]))
    assert camhd_optimizer_description(trainer.optimizer) in line


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_from_checkpoint_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, dataset):
    def run(out, callbacks=(), resume=None, save=True):
        args = _args(out, max_steps=8, save_strategy="steps" if save else "no", save_steps=4, learning_rate=2e-3)
        trainer = Trainer(model=tiny_bert(seed=0 if resume is None else 7), args=args, train_dataset=dataset,
                          optimizer_cls_and_kwargs=(CAMHDOptimizerFactory, FACTORY_KW),
                          callbacks=[CAMHDCallback(), *callbacks])
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", save=False)
    stopped = run(tmp_path / "stopped", callbacks=[StopAt(4)])
    assert stopped.state.global_step == 4
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "stopped" / "checkpoint-4"))
    a, b = unwrap_camhd(full.optimizer), unwrap_camhd(resumed.optimizer)
    assert a.num_steps == b.num_steps == 8
    assert torch.equal(a.gamma, b.gamma)
    for lv in a.levels:
        assert torch.equal(a.alpha(lv), b.alpha(lv)), lv
    for (n, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), n
    assert _camhd_logs(full)[-1] == _camhd_logs(resumed)[-1]


# ------------------------------------------------------------------------------------------ the README's snippets
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_trainer_snippets() -> tuple[str, list[str]]:
    """The README's `transformers.Trainer` section: its imports block and one block per way in."""
    text = README.read_text()
    section = text[text.index("### `transformers.Trainer`"):]
    section = section[:re.search(r"\n##+ ", section).start()]  # up to the next heading
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return blocks[0], blocks[1:]


def test_readme_shows_three_trainer_paths():
    imports, paths = readme_trainer_snippets()
    assert "CAMHDCallback" in imports and len(paths) == 3
    assert "optimizers=(CAMHDAdamW(model" in paths[0] and "CAMHDOptimizerFactory" in paths[1]
    assert "CAMHDTrainer(" in paths[2]


@pytest.mark.parametrize("path", range(3), ids=["optimizers", "factory", "CAMHDTrainer"])
def test_each_readme_trainer_snippet_puts_the_learned_rates_in_log_history(tmp_path, dataset, path):
    imports, paths = readme_trainer_snippets()
    recorder = Recorder()
    namespace = {"model": tiny_bert(), "args": _args(tmp_path), "ds": dataset}
    exec(imports, namespace)
    exec(paths[path], namespace)  # exactly the README's lines
    trainer = namespace["trainer"]
    trainer.add_callback(recorder)  # a reporting integration registered as the Trainer registers them
    trainer.train()
    opt = unwrap_camhd(trainer.optimizer)
    logs = _camhd_logs(trainer)
    assert len(logs) == 3 and opt.num_steps == 6
    for e in logs:
        assert {f"camhd/gamma_{lv}" for lv in opt.levels} <= e.keys(), e.keys()
        assert {"camhd/effective_lr_mean", "camhd/alpha_star_mean", "learning_rate"} <= e.keys()
    assert all(f"camhd/gamma_{opt.levels[-1]}" in e for e in recorder.logs if "loss" in e)
    assert logs[-1][f"camhd/gamma_{opt.levels[0]}"] == pytest.approx(float(opt.gamma[0]), abs=1e-7)


@pytest.mark.parametrize("scheduler", ["linear", "cosine"])
def test_logged_effective_rate_is_the_rate_the_step_used(tmp_path, dataset, scheduler):
    """With the rates frozen (β = δ = 0), the effective rate is α₀ · s, s the scheduler's multiplier for the step
    just taken: exactly the Trainer's logged `learning_rate` at every log."""
    model = tiny_bert()
    opt = CAMHDAdam(model, lr=2e-3, levels=("global", "block", "layer"), hypergrad_lr=0.0, gamma_lr=0.0)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=10, logging_steps=1, warmup_steps=3,
                                              lr_scheduler_type=scheduler),
                      train_dataset=dataset, optimizers=(opt, None))
    CAMHDCallback.install(trainer)
    trainer.train()
    logs = _camhd_logs(trainer)
    assert len(logs) == 10
    for e in logs:
        assert e["camhd/effective_lr_mean"] == pytest.approx(e["learning_rate"], rel=1e-6, abs=1e-12), e["step"]


def test_publish_with_trainer_optimizer_writes_the_camhd_card(tmp_path, dataset):
    """`publish(..., optimizer=trainer.optimizer)` after a Trainer run: trainer.optimizer is accelerate's
    AcceleratedOptimizer; the card names the CAM-HD class, its levels and the learned rates."""
    from accelerate.optimizer import AcceleratedOptimizer
    from huggingface_hub import ModelCard

    from hf_camhd.hub import publish

    model = tiny_bert()
    trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=dataset,
                      optimizers=(CAMHDAdamW(model, lr=2e-3, levels=("global", "block", "layer"), hypergrad_lr=1e-5, hypergrad_rule="additive",
                                             gamma_lr=0.1), None))
    trainer.train()
    assert isinstance(trainer.optimizer, AcceleratedOptimizer)
    folder = publish(trainer.model, tmp_path / "hub", results={"accuracy": 0.75}, optimizer=trainer.optimizer,
                     dataset="synthetic", task="text-classification")
    card = ModelCard.load(folder / "README.md")
    assert "camhd" in card.data.tags
    assert "`adamw-camhd` (`CAMHDAdamW`), base rule: adamw" in card.text
    assert "| levels | global, block, layer |" in card.text and "AcceleratedOptimizer" not in card.text
    opt = unwrap_camhd(trainer.optimizer)
    rows = re.findall(r"^\| (global|block|layer) \| ([0-9.]+) \| ([0-9.e+-]+) \|", card.text, flags=re.M)
    assert [r[0] for r in rows] == ["global", "block", "layer"]
    assert [float(r[1]) for r in rows] == pytest.approx([round(x, 4) for x in opt.gamma.tolist()], abs=1e-4)
    assert float(rows[2][2]) == pytest.approx(float(opt.alpha("layer").mean()), rel=1e-3)
    assert "| lr (α₀) | 0.002 |" in card.text  # the optimizer's α₀, not the scheduler's final 0.0


def test_publish_says_clearly_when_the_optimizer_is_not_camhd(tmp_path, dataset):
    from huggingface_hub import ModelCard

    from hf_camhd.hub import publish

    model = tiny_bert()
    trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=dataset,
                      optimizers=(torch.optim.AdamW(model.parameters(), lr=2e-3), None))
    trainer.train()
    with pytest.warns(UserWarning, match="the optimizer is AdamW, not a CAM-HD optimizer"):
        folder = publish(trainer.model, tmp_path / "hub", results={"accuracy": 0.5}, optimizer=trainer.optimizer,
                         dataset="synthetic", task="text-classification")
    card = ModelCard.load(folder / "README.md").text
    assert "trained with **AdamW**, not a CAM-HD optimizer" in card and "AcceleratedOptimizer" not in card
    assert "| lr | 0.002 |" in card and "Learned rates" not in card
    with pytest.raises(ValueError, match=r"AdamW \(inside AcceleratedOptimizer\) is not a CAM-HD optimizer"):
        camhd_optimizer_description(trainer.optimizer)
