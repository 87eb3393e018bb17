"""The evaluate modules shipped in hf_camhd.metrics: same numbers as scikit-learn, and as the Hub modules when
those can be loaded; they load offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from hf_camhd import metrics


def _cases():
    """Fixed predictions: binary, 3- and 10-class, unbalanced, with and without sample weights, degenerate."""
    rng = np.random.default_rng(0)
    out = []
    for n, k, p_right in ((50, 2, 0.7), (200, 3, 0.5), (500, 10, 0.8), (40, 10, 0.1), (30, 2, 1.0)):
        refs = rng.integers(0, k, n)
        refs[: n // 3] = 0  # unbalanced
        preds = np.where(rng.random(n) < p_right, refs, rng.integers(0, k, n))
        weights = rng.random(n) + 0.1
        out += [(preds, refs, None), (preds, refs, weights)]
    out.append((np.zeros(6, int), np.zeros(6, int), None))  # one class only
    out.append((np.array([0, 0, 0, 1]), np.array([1, 1, 0, 1]), None))
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def shipped():
    return {name: metrics.load(name) for name in metrics.METRICS}


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # scikit-learn, on the 1-class case
@pytest.mark.parametrize("i", range(len(CASES)))
def test_accuracy_and_mcc_equal_scikit_learn(shipped, i):
    preds, refs, w = CASES[i]
    acc = shipped["accuracy"].compute(predictions=preds, references=refs, sample_weight=w)
    assert acc == {"accuracy": pytest.approx(accuracy_score(refs, preds, sample_weight=w), abs=1e-12)}
    count = shipped["accuracy"].compute(predictions=preds, references=refs, sample_weight=w, normalize=False)
    assert count["accuracy"] == pytest.approx(accuracy_score(refs, preds, sample_weight=w, normalize=False))
    mcc = shipped["matthews_correlation"].compute(predictions=preds, references=refs, sample_weight=w)
    assert mcc["matthews_correlation"] == pytest.approx(matthews_corrcoef(refs, preds, sample_weight=w), abs=1e-12)


@pytest.mark.parametrize("average", ["binary", "micro", "macro", "weighted", None])
@pytest.mark.parametrize("i", range(len(CASES)))
def test_f1_equals_scikit_learn(shipped, i, average):
    preds, refs, w = CASES[i]
    if average == "binary" and len(np.union1d(preds, refs)) > 2:
        with pytest.raises(ValueError, match="'binary' needs at most two classes"):
            shipped["f1"].compute(predictions=preds, references=refs, average=average)
        return
    ours = shipped["f1"].compute(predictions=preds, references=refs, average=average, sample_weight=w)["f1"]
    theirs = f1_score(refs, preds, average=average, sample_weight=w, zero_division=0.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-12)


def test_batches_accumulate_like_one_call(shipped):
    preds, refs, _ = CASES[4]
    acc = metrics.load("accuracy")
    for start in range(0, len(refs), 64):
        acc.add_batch(predictions=preds[start:start + 64], references=refs[start:start + 64])
    assert acc.compute() == shipped["accuracy"].compute(predictions=preds, references=refs)


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError, match="Unknown metric 'bleu'; hf_camhd ships accuracy, f1, matthews_correlation"):
        metrics.metric_path("bleu")


HUB_COMPARISON = textwrap.dedent("""
    import json, sys
    import numpy as np
    import evaluate
    from hf_camhd import metrics
    preds, refs = json.loads(sys.argv[1])
    out = {}
    for name, kwargs in (("accuracy", {}), ("f1", {"average": "macro"}), ("matthews_correlation", {})):
        ours = metrics.load(name).compute(predictions=preds, references=refs, **kwargs)
        try:
            hub = evaluate.load(name)
        except Exception as err:  # not cached and no network
            out[name] = {"ours": ours, "hub": None, "error": f"{type(err).__name__}: {err}"}
        else:
            out[name] = {"ours": ours, "hub": hub.compute(predictions=preds, references=refs, **kwargs),
                         "hub_name": hub.name}
    print(json.dumps(out))
""")


def test_shipped_modules_load_offline_and_agree_with_the_hub_modules_where_those_load(tmp_path):
    """Offline (HF_HUB_OFFLINE=1): the shipped modules always load and compute; the Hub's modules load only when
    already in the evaluate module cache, and then give the same names and numbers."""
    preds, refs, _ = CASES[2]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", HUB_COMPARISON, json.dumps([preds.tolist(), refs.tolist()])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {"accuracy": accuracy_score(refs, preds), "f1": f1_score(refs, preds, average="macro"),
                "matthews_correlation": matthews_corrcoef(refs, preds)}
    for name, row in out.items():
        assert row["ours"] == {name: pytest.approx(expected[name], abs=1e-12)}, name
        if row["hub"] is None:  # the reason the modules ship with hf_camhd
            assert "FileNotFoundError" in row["error"] or "ConnectionError" in row["error"], row["error"]
        else:
            assert row["hub_name"] == name and row["hub"] == {name: pytest.approx(row["ours"][name], abs=1e-12)}
