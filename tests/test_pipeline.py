"""End to end: a short agu run on the shipped GAN lowers the forgotten class; agu table writes its files."""

from __future__ import annotations

import json

import pytest
import torch

from agu_lib.cli import main

SHORT = ["--iters", "150", "--adapt-iters", "150", "--n-samples", "2000", "--n-eval", "1000", "--quiet", "--device", "cpu"]


def test_short_run_lowers_the_forgotten_class(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "digits", "--classifier", "digits", "--forget", "1", "--out", str(out), *SHORT]) == 0
    m = json.loads((out / "metrics.json").read_text())
    u, o = m["unlearned"], m["original"]
    assert u["negative_share"] < o["negative_share"]
    assert u["pul"] > 30.0  # 150 steps of each stage: measured 54
    assert u["retained_tv"] < 0.1
    assert m["adapted"]["negative_share"] > 2 * o["negative_share"]  # stage 1 moved towards the negatives
    assert "SmallCNN" in m["feature_network"]
    for f in ("unlearned/card.json", "adapted/card.json", "config.json", "log.json", "before.png", "after.png",
              "latents.safetensors", "feedback.json"):
        assert (out / f).is_file(), f
    # stage 1's default K = 5 adapted models, each from its own draw of negatives: all saved, all different
    assert sorted(p.name for p in out.glob("adapted*")) == ["adapted", "adapted-1", "adapted-2", "adapted-3", "adapted-4"]
    assert len(json.loads((out / "log.json").read_text())["adapt"]) == 5
    assert (out / "adapted" / "generator.safetensors").read_bytes() != (out / "adapted-4" / "generator.safetensors").read_bytes()
    from agu_lib import load_gan

    assert load_gan(out / "unlearned").image_shape == (1, 16, 16)
    out_text = capsys.readouterr().out
    assert "PUL" in out_text and ("(adapted/, adapted-1/ ... adapted-4/, unlearned/, after.png, before.png, config.json, "
                                  "feedback.json, latents.safetensors, log.json, metrics.json)") in out_text
    assert o["fid_positives_floor"] > 0 and "fid_positives_floor" not in u  # the floor: a reference of the original
    assert f"floor            FID positives {o['fid_positives_floor']:.4f}" in out_text
    # FID to the positives and its two parts, the kept images' drift and the replacements alone
    assert f"    kept latents   original    0.0000   unlearned {u['fid_positives_kept']:9.4f}" in out_text
    assert f"    replaced only  original {o['fid_positives']:9.4f}   unlearned {u['fid_positives_replaced']:9.4f}" in out_text
    assert u["fid_positives_kept"] > 0 and u["fid_positives_replaced"] < o["fid_positives"]
    assert f"    replaced only  original    0.0000   unlearned {u['retained_tv_replaced']:9.4f}" in out_text
    assert f"adapted          negative share {m['adapted']['negative_share']:.4f}  (stage 1's first adapted GAN" in out_text


def test_finetune_on_flagged_fakes_runs_without_stage_1(tmp_path, capsys):
    """--negative-source flagged: the fine-tuning baseline's D learns the flagged negatives as fakes, no adapted GAN is
    made, and the run says what it wrote."""
    out = tmp_path / "run"
    args = ["run", "digits", "--classifier", "digits", "--forget", "8", "--method", "finetune", "--negative-source", "flagged",
            "--out", str(out), *SHORT]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["unlearned"]["pul"] > 60.0  # 150 steps: measured 95.2; 16.3 with --negative-weight 0
    assert not list(out.glob("adapted*")) and "adapted" not in m
    assert json.loads((out / "config.json").read_text())["unlearn"]["negative_source"] == "flagged"
    assert "/ (unlearned/, after.png, before.png, config.json," in capsys.readouterr().out  # no adapted/ listed


def test_unlearn_command_without_adapted_gans(tmp_path, capsys):
    """agu unlearn alone: the default source drops the fakes with a note; flagged fakes need no adapted GAN and change
    the result; "both" without adapted GANs is refused with what to do."""
    base = ["unlearn", "digits", "--classifier", "digits", "--forget", "8", "--method", "finetune", "--iters", "20",
            "--n-samples", "1000", "--quiet", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert "no --adapted GANs" in capsys.readouterr().err
    assert main([*base, "--negative-source", "flagged", "--out", str(tmp_path / "flagged")]) == 0
    assert "no --adapted GANs" not in capsys.readouterr().err
    plain, flagged = ((tmp_path / d / "generator.safetensors").read_bytes() for d in ("plain", "flagged"))
    assert plain != flagged
    assert main([*base, "--negative-source", "both", "--out", str(tmp_path / "both")]) == 2
    err = capsys.readouterr().err
    assert "none were given" in err and "--negative-source flagged" in err and "Traceback" not in err
    assert not (tmp_path / "both").exists()


def test_table_writes_markdown_csv_json(tmp_path):
    out = tmp_path / "table"
    args = ["table", "digits", "--classifier", "digits", "--forget", "4", "--seeds", "2", "--methods", "finetune", "extrapolate",
            "el2", "--iters", "20", "--adapt-iters", "20", "--n-samples", "1000", "--n-eval", "300", "--out", str(out),
            "--quiet", "--device", "cpu"]
    assert main(args) == 0
    md = (out / "table.md").read_text()
    for row in ("Fine-tune on positives", "Extrapolation", "EL2", "class 4", "±"):
        assert row in md
    res = json.loads((out / "table.json").read_text())
    methods = {r["method"] for r in res["records"]}
    assert methods == {"finetune", "extrapolate", "el2", "original", "adapted"}
    assert len([r for r in res["records"] if r["method"] == "el2"]) == 2  # one per seed
    # the reference row: the original's positives on other latents (metric "floor"), with its ratio and TV
    floor_row = next(line for line in md.splitlines() if line.startswith("| Floor: the original's positives, other latents |"))
    assert floor_row.endswith(" / – |") and "±" in floor_row
    originals = [r for r in res["records"] if r["method"] == "original"]
    assert all(r["fid_positives_floor_ratio"] == pytest.approx(r["fid_positives_floor"] / r["fid_positives"]) for r in originals)
    assert all("fid_positives_floor" not in r for r in res["records"] if r["method"] != "original")
    assert (out / "table.csv").read_text().startswith("class,seed,method,")


def test_feature_level_run_with_a_predicate(tmp_path):
    """--bold forgets 'bold strokes' (a predicate oracle); PUL is measured with the same predicate."""
    out = tmp_path / "bold"
    args = ["run", "digits", "--bold", "80", "--classifier", "digits", "--out", str(out), "--iters", "20", "--adapt-iters", "150",
            "--n-samples", "1000", "--n-eval", "500", "--quiet", "--device", "cpu"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["oracle"].startswith("bold strokes: ink mass >")
    assert 0.15 < m["original"]["negative_share"] < 0.25  # the top 20% by ink mass
    assert "pul" in m["unlearned"] and "fid_positives" in m["unlearned"]
    assert m["adapted"]["negative_share"] > 0.6  # 150 steps of stage 1 make mostly bold strokes (measured 0.92)


def test_methods_without_stage_1_need_only_one_negative():
    from agu_lib.pipeline import RunConfig, needed_negatives

    cfg = RunConfig()
    assert needed_negatives(cfg, ["el2"]) == 8 and needed_negatives(cfg, ["finetune", "extrapolate"]) == 8
    assert needed_negatives(cfg, ["retrain"]) == 1
    assert needed_negatives(cfg, ["finetune"]) == 8  # by default the baselines take the adapted GANs' samples as fakes too
    cfg.unlearn.negative_weight = 0.0  # the paper's baselines: no stage 1
    assert needed_negatives(cfg, ["finetune"]) == needed_negatives(cfg, ["ewc", "retrain"]) == 1


def test_a_diverged_method_is_a_row_not_the_end_of_the_table(tmp_path, monkeypatch, capsys):
    """A method whose training fails (TrainingError) is recorded as diverged; the other rows are computed."""
    from agu_lib import pipeline
    from agu_lib.errors import TrainingError

    real_apply = pipeline.apply_method

    def apply(method, gan, *a, **k):
        if method == "nl2":
            raise TrainingError("unlearn (nl2): loss g_adv became NaN or Inf at step 3")
        return real_apply(method, gan, *a, **k)

    monkeypatch.setattr(pipeline, "apply_method", apply)
    out = tmp_path / "table"
    args = ["table", "digits", "--classifier", "digits", "--forget", "4", "--seeds", "1", "--methods", "nl2", "finetune",
            "--iters", "5", "--adapt-iters", "5", "--n-samples", "1000", "--n-eval", "300", "--out", str(out), "--quiet",
            "--device", "cpu"]
    assert main(args) == 0
    md = (out / "table.md").read_text()
    assert "| NL2 | diverged |" in md and "Fine-tune on positives | " in md
    recs = json.loads((out / "table.json").read_text())["records"]
    assert [r["diverged"] for r in recs if r["method"] == "nl2"] == ["unlearn (nl2): loss g_adv became NaN or Inf at step 3"]
    assert "diverged" in capsys.readouterr().err
    head, *rows = (out / "table.csv").read_text().splitlines()
    col = head.split(",").index("diverged")
    assert [r.split(",")[col] for r in rows if ",nl2," in r] == ["1"]


def _fake_table(cls, methods=("el2",), seeds=(0, 1), command="agu table x"):
    recs = []
    for s in seeds:
        recs.append({"class": cls, "seed": s, "method": "original", "seconds": 0.0, "pul": 0.0, "fid_positives_ratio": 1.0})
        recs += [{"class": cls, "seed": s, "method": m, "seconds": 1.0, "pul": 50.0 + cls + s, "fid_positives_ratio": 0.5}
                 for m in methods]
    return {"feature_network": "net", "classes": [cls], "seeds": list(seeds), "methods": list(methods),
            "config": {"n_eval": 10, "command": command}, "records": recs}


def test_merge_tables_joins_classes_and_refuses_mismatches(tmp_path, capsys):
    from agu_lib.errors import ConfigError
    from agu_lib.pipeline import merge_tables, write_table

    for c in (1, 4):
        write_table(_fake_table(c, command=f"agu table x --forget {c}"), tmp_path / f"t{c}")
    assert main(["merge-tables", str(tmp_path / "t1"), str(tmp_path / "t4"), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "table.json").read_text())
    assert merged["classes"] == [1, 4] and len(merged["records"]) == 8
    assert merged["config"]["command"] == ["agu table x --forget 1", "agu table x --forget 4"]
    a, b = _fake_table(1), _fake_table(4)  # made on other machines: merged, and both environments kept
    a["config"]["environment"], b["config"]["environment"] = {"threads": 1}, {"threads": 4}
    assert merge_tables([a, b])["config"]["environment"] == [{"threads": 1}, {"threads": 4}]
    b["config"]["environment"] = {"threads": 1}
    assert merge_tables([a, b])["config"]["environment"] == {"threads": 1}
    md = (tmp_path / "m" / "table.md").read_text()
    assert "class 1 | class 4" in md and "51.5 ± 0.7" in md and "54.5 ± 0.7" in md
    with pytest.raises(ConfigError, match="methods"):
        merge_tables([_fake_table(1), _fake_table(4, methods=("el2", "finetune"))])
    with pytest.raises(ConfigError, match="share classes"):
        merge_tables([_fake_table(1), _fake_table(1)])
    other = _fake_table(4)
    other["config"]["n_eval"] = 20
    with pytest.raises(ConfigError, match="differ: n_eval"):
        merge_tables([_fake_table(1), other])
    assert main(["merge-tables", str(tmp_path / "nothing"), "--out", str(tmp_path / "m2")]) == 2
    assert "holds no table.json" in capsys.readouterr().err


def test_table_jobs_gives_the_records_of_one_process(tmp_path, capsys):
    """--jobs 2 computes the classes in two processes; the records are those of --jobs 1 but for the seconds
    (with two threads too: each worker once got half of them, and other numbers), the table keeps one command
    and records the thread count; --jobs 0 is refused."""
    base = ["table", "digits", "--classifier", "digits", "--forget", "1", "8", "--seeds", "1", "--methods", "finetune", "el2",
            "--iters", "10", "--adapt-iters", "10", "--k", "2", "--n-samples", "1000", "--n-eval", "200", "--quiet",
            "--device", "cpu", "--threads", "2"]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    assert main([*base, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = (json.loads((tmp_path / d / "table.json").read_text()) for d in ("one", "two"))
    drop = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]
    assert two["classes"] == [1, 8] and len(two["records"]) == len(one["records"]) == 8
    assert drop(two["records"]) == drop(one["records"])
    assert one["config"]["environment"]["threads"] == 2 and one["config"]["environment"]["torch"] == torch.__version__
    assert "merged_from" not in two and isinstance(two["config"]["command"], str)  # one command, not one per process
    assert two["config"] == one["config"]  # (the command line: sys.argv, here pytest's)
    capsys.readouterr()
    assert main([*base, "--jobs", "0", "--out", str(tmp_path / "zero")]) == 2
    assert "jobs must be an integer at least 1" in capsys.readouterr().err and not (tmp_path / "zero").exists()


def test_table_jobs_workers_print_notes_as_one_line(tmp_path, capfd):
    """A library warning inside an `agu table --jobs` worker reads as in one process: `agu: note: ...`,
    without Python's source location and line."""
    argv = ["table", "digits", "--classifier", "digits", "--forget", "1", "8", "--seeds", "1", "--methods", "finetune",
            "--iters", "2", "--adapt-iters", "2", "--k", "1", "--n-samples", "300", "--n-eval", "50", "--quiet",
            "--device", "cpu", "--jobs", "2", "--out", str(tmp_path / "t")]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert "agu: note: adapt:" in err and "fewer than n_negatives = 32" in err  # (about 23 negatives in 300 samples)
    assert "UserWarning" not in err and "warnings.warn(" not in err


def test_table_meets_an_evaluation_refusal_before_any_stage(tmp_path, capsys, evaluation_refused):
    """As agu run: the evaluation latents are scored right after the feedback, before stage 1 or retraining."""
    argv = ["table", "digits", "--classifier", "digits", "--forget", "1", "--seeds", "1", "--methods", "el2", "retrain",
            "--n-samples", "300", "--n-eval", "200", "--quiet", "--device", "cpu", "--out", str(tmp_path / "t")]
    assert main(argv) == 2
    assert "outside its output range" in capsys.readouterr().err and not (tmp_path / "t").exists()
