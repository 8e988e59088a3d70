"""`dinomix finetune`: version naming, iteration planning, the verdict, and a real tiny fine-tune in a subprocess
that registers a new model version with its parent recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dinomix import registry
from dinomix.datasets import BTCV_NAMES, Case, Dataset
from dinomix.modelfile import load_model
from dinomix.training.finetune.budget import plan_iterations
from dinomix.training.finetune.verdict import compare
from dinomix.training.finetune.versions import next_version_name

PARENT = "abdomen-btcv13"  # the built-in (shipped, trained) model
CORRECTED = ["liver", "pancreas", "spleen"]


# ---------------------------------------------------------------- units

def test_corrected_organs_are_those_annotated_in_partially_labeled_cases():
    from dinomix.organs import OrganSchema
    from dinomix.training.finetune.cases import corrected_organs

    schema = OrganSchema.from_names([n for v, n in BTCV_NAMES.items() if v])
    full = Case(id="a", image="a.nii.gz", label="a_label.nii.gz", label_map=dict(BTCV_NAMES))
    part = Case(id="b", image="b.nii.gz", label="b_label.nii.gz", label_map=dict(BTCV_NAMES),
                annotated=["pancreas", "gallbladder"])
    scan = Case(id="c", image="c.nii.gz")
    assert corrected_organs([full, part, scan], schema) == ["gallbladder", "pancreas"]  # schema order
    assert corrected_organs([full, scan], schema) == []


def test_parent_distillation_is_off_unless_asked_for():
    from dinomix.errors import DinomixError
    from dinomix.training.finetune.config import parent_distillation_settings

    assert parent_distillation_settings(None, ["liver"]) == {"weight": 0.0, "free_organs": ["liver"]}
    assert parent_distillation_settings(1.0, ["liver"]) == {"weight": 1.0, "free_organs": ["liver"]}
    with pytest.raises(DinomixError, match="--parent-distillation"):
        parent_distillation_settings(-1.0, [])


def _finetune_parse(argv: list[str]):
    """`dinomix finetune`'s own argument parser, as the command line builds it."""
    import argparse

    from dinomix.cli.finetune import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    return sub.choices["finetune"].parse_args(argv)


def test_the_corrected_organs_are_open_only_when_asked_for():
    from dinomix.training.config import SemiConfig
    from dinomix.training.finetune.config import finetune_semi_defaults

    parent = SemiConfig(method="pic")
    assert finetune_semi_defaults("pic", parent, ["liver"])["pseudo_labels"].open_organs == ["liver"]
    assert finetune_semi_defaults("pic", parent)["pseudo_labels"].open_organs == []
    parse = _finetune_parse
    assert parse(["--model", "m", "--dataset", "d", "--iterations", "1"]).open_organs is False
    assert parse(["--model", "m", "--dataset", "d", "--iterations", "1", "--open-organs"]).open_organs is True


def test_the_consistency_weight_is_the_parents_unless_given():
    parse = _finetune_parse
    assert parse(["--model", "m", "--dataset", "d", "--iterations", "1"]).consistency_weight is None
    assert parse(["--model", "m", "--dataset", "d", "--iterations", "1",
                  "--consistency-weight", "0.3"]).consistency_weight == 0.3


def test_a_negative_consistency_weight_is_refused_by_name():
    from dinomix.errors import DinomixError
    from dinomix.events import Reporter
    from dinomix.training.finetune import FinetuneOptions
    from dinomix.training.finetune.steps import finetune

    opts = FinetuneOptions(model=PARENT, dataset="unused", iterations=1, consistency_weight=-0.5)
    with pytest.raises(DinomixError, match="--consistency-weight must be 0 or more"):
        finetune(opts, Reporter(bar=False), lambda: None)


def test_new_versions_are_numbered_after_the_highest_in_use():
    assert next_version_name("m", set()) == "m.ft1"
    assert next_version_name("m", {"m", "m.ft1", "m.ft3", "other.ft9", "m.ft2.ft1", "mx.ft7"}) == "m.ft4"
    assert next_version_name("a.b", {"a.b.ft1", "aXb.ft5"}) == "a.b.ft2"  # the parent name is literal, not a regex


def test_iterations_fill_the_budget_left_after_setup_and_evaluation():
    # 600 s budget, 100 s spent, final evaluation + export 40 s, 8% margin: (460 * 0.92) / 2 s = 211.6
    assert plan_iterations(600, 100, 2.0, 40) == 211
    assert plan_iterations(600, 100, 2.0, 40, margin=0.0) == 230
    assert plan_iterations(60, 70, 1.0, 5) == 0


def test_verdict_says_plainly_when_the_new_model_is_worse():
    before = {"mean_dice": 60.0, "dice": {"liver": 90.0, "pancreas": 30.0}}
    worse = {"mean_dice": 57.0, "dice": {"liver": 84.0, "pancreas": 30.0}}
    per, is_worse, verdict = compare(before, worse)
    assert is_worse is True and verdict.startswith("WORSE than its parent")
    assert per["liver"] == {"before": 90.0, "after": 84.0, "delta": -6.0}
    assert "liver -6.0" in verdict and "pancreas" not in verdict.split("Organs down")[1]
    better = {"mean_dice": 62.0, "dice": {"liver": 89.5, "pancreas": 34.5}}
    per, is_worse, verdict = compare(before, better)
    assert is_worse is False and "WORSE" not in verdict and "Organs down" not in verdict
    per, is_worse, verdict = compare(None, None)
    assert per == {} and is_worse is None and "not evaluated" in verdict


# ---------------------------------------------------------------- the real command

def _dataset(tmp: Path, data_dir: Path) -> Path:
    d = data_dir / "btcv"

    def case(cid: str, labeled: bool, **kw) -> Case:
        return Case(id=f"btcv_img{cid}", image=str(d / f"btcv_img{cid}_ct.nii.gz"),
                    label=str(d / f"btcv_img{cid}_label.nii.gz") if labeled else None,
                    label_map=dict(BTCV_NAMES) if labeled else {}, **kw)

    cases = [case("0021", True, annotated=CORRECTED, split="train"),  # corrected for 3 organs only
             case("0024", False, split="train"),                       # an unlabeled scan
             case("0004", True, split="train")]                        # held out with --holdout
    return Dataset(name="corrections", cases=cases).save(tmp / "corrections" / "dataset.json")


@pytest.fixture(scope="module")
def registry_env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ft-home")
    return {"DINOMIX_MODELS_DIR": str(root / "models"), "XDG_CACHE_HOME": str(root / "cache")}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, data_dir, registry_env, dinomix):
    tmp = tmp_path_factory.mktemp("finetune")
    manifest = _dataset(tmp, data_dir)
    res = dinomix("finetune", "--model", PARENT, "--dataset", manifest, "--priority", "pancreas", "liver",
                  "--iterations", "2", "--events", "-", "--holdout", "btcv_img0004",
                  "--patch-size", "32", "--threads", "1", "--parent-distillation", "0.5", "--open-organs",
                  "--consistency-weight", "0.5", env=registry_env,
                  timeout=1200)
    assert res.returncode == 0, res.describe()
    return res, manifest


def test_finetune_registers_a_new_version_with_its_parent(finetuned, registry_env, dinomix):
    res, _ = finetuned
    result = [e for e in res.events() if e["event"] == "result"][-1]
    assert result["model"] == f"{PARENT}.ft1" and result["parent"] == PARENT
    path = Path(result["path"])
    assert path.parent == Path(registry_env["DINOMIX_MODELS_DIR"]) and path.is_file()
    assert Path(result["run_dir"]).parent == Path(registry_env["XDG_CACHE_HOME"], "dinomix", "finetune")
    net, meta = load_model(path)
    assert meta.model_id == f"{PARENT}.ft1" and meta.parent == PARENT and meta.trained
    assert meta.training["finetune"]["parent"] == PARENT
    assert meta.training["finetune"]["priority"] == ["pancreas", "liver"]
    assert meta.training["config"]["semi"]["method"] == "pic"
    assert meta.training["config"]["semi"]["pic"]["priority"] == {"pancreas": 3.0, "liver": 3.0}
    # fine-tune defaults whatever the parent used: per-class thresholds, the student on the mixed patches only
    assert meta.training["config"]["semi"]["pseudo_labels"]["threshold"] == "class_quantile"
    assert meta.training["config"]["semi"]["student_patches"] == "mixed"
    assert meta.training["config"]["semi"]["rampup"] == 0.0       # the teacher is trained from the start
    assert meta.training["config"]["semi"]["consistency_weight"] == 0.5  # asked for here (--consistency-weight)
    # asked for here: the parent's background does not rule out the corrected and priority organs
    assert meta.training["config"]["semi"]["pseudo_labels"]["open_organs"] == ["spleen", "liver", "pancreas"]
    # distillation from the frozen parent (asked for here), which has no say on the corrected and priority organs
    pd = meta.training["config"]["semi"]["parent_distillation"]
    assert pd["weight"] == 0.5 and pd["free_organs"] == ["spleen", "liver", "pancreas"]
    assert meta.training["finetune"]["parent_distillation"] == pd
    parent_cfg = registry.resolve(PARENT).meta.training["config"]
    assert meta.training["config"]["optim"]["lr"] == parent_cfg["optim"]["lr"]
    assert set(meta.training["semi"]["pseudo_label_thresholds_final"]["tau"]) == {"background", *meta.organs.names}
    assert meta.training["semi"]["labeled_cases"] == ["btcv_img0021"]
    assert meta.training["semi"]["unlabeled_cases"] == ["btcv_img0024"]
    parent_modes = set(registry.resolve(PARENT).meta.preprocessing.modes)
    assert set(meta.preprocessing.modes) == parent_modes  # every inference mode of the parent kept
    assert meta.training["config"]["train_modes"] == {}  # a parent trained on several grids is fine-tuned on one
    listed = dinomix("models", "list", "--json", env=registry_env)
    assert listed.returncode == 0, listed.describe()
    entry = [m for m in json.loads(listed.stdout) if m["name"] == f"{PARENT}.ft1"]
    assert entry and entry[0]["parent"] == PARENT


def test_finetune_events_report_progress_loss_time_left_and_dice_before_and_after(finetuned):
    res, _ = finetuned
    ev = res.events()
    kinds = [e["event"] for e in ev]
    assert kinds[0] == "start" and kinds[-1] == "result" and "progress" in kinds
    train = [e for e in ev if e["event"] == "metric" and e.get("kind") == "train"]
    assert [e["iteration"] for e in train] == [1, 2]
    assert all("loss" in e and "time_left_s" in e and e["iterations"] == 2 for e in train)
    assert all(e["loss_parent"] >= 0.0 for e in train)
    evals = {e["phase"]: e for e in ev if e["event"] == "metric" and e.get("kind") == "eval"}
    assert set(evals) == {"before", "after"}
    assert evals["before"]["model"] == PARENT and evals["after"]["model"] == f"{PARENT}.ft1"
    result = ev[-1]
    assert result["holdout"] == ["btcv_img0004"]
    assert result["train_cases"]["partially_labeled"] == ["btcv_img0021"]
    assert set(result["per_organ"]) == set(evals["before"]["dice"]) and "liver" in result["per_organ"]
    for rec in result["per_organ"].values():
        assert set(rec) == {"before", "after", "delta"}
    assert isinstance(result["worse_than_parent"], bool)
    assert ("WORSE" in result["verdict"]) == result["worse_than_parent"]
    logs = " ".join(e["message"] for e in ev if e["event"] == "log")
    assert result["verdict"] in logs and "UNTRAINED" not in logs


def test_finetune_never_overwrites_and_explains_bad_input(finetuned, registry_env, dinomix):
    _, manifest = finetuned
    common = ["finetune", "--model", PARENT, "--dataset", manifest, "--iterations", "1"]
    res = dinomix(*common, "--new-name", f"{PARENT}.ft1", env=registry_env)
    assert res.returncode != 0 and "already exists" in res.stderr and "Traceback" not in res.output
    res = dinomix(*common, "--holdout", "btcv_img9999", env=registry_env)
    assert res.returncode != 0 and "no case btcv_img9999" in res.stderr
    res = dinomix(*common, "--holdout", "btcv_img0024", env=registry_env)
    assert res.returncode != 0 and "has no label" in res.stderr
    res = dinomix(*common, "--priority", "brain", env=registry_env)
    assert res.returncode != 0 and "no organ 'brain'" in res.stderr
    res = dinomix("finetune", "--model", PARENT, "--dataset", manifest, env=registry_env)
    assert res.returncode != 0 and "--minutes" in res.stderr  # a budget is required
    folder = Path(registry_env["DINOMIX_MODELS_DIR"])
    models = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert models == [f"{PARENT}.ft1.safetensors"]
    assert (folder / ".dinomix-digests.json").is_file()  # the registered version's digest, kept outside the file

