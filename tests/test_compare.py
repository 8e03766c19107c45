"""``archer compare``: the aggregation over seeds (hand-checked numbers) and the whole command end to end."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from archer.cli import main
from archer.compare import (
    final_and_best,
    loss_as_run,
    loss_changes,
    mean_and_spread,
    paths_config,
    plan_runs,
    read_run_metrics,
    seed_band,
    smooth,
)
from archer.report import metric_series

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "configs" / "compare_quickstart.yaml"
DAPO = ROOT / "configs" / "compare" / "dapo.yaml"
GSPO = ROOT / "configs" / "compare" / "gspo.yaml"


def _series(values, start=0):
    return pd.Series(values, index=range(start, start + len(values)), dtype=float)


# ------------------------------------------------------------------------------------- aggregation
def test_smooth_is_a_trailing_mean_over_a_tenth_of_the_points():
    # 20 points -> window max(1, 20 // 10) = 2; the first full window ends at step 1: (0 + 1) / 2
    smoothed = smooth(_series(range(20)))
    assert smoothed.index.tolist() == list(range(1, 20))
    assert smoothed.tolist() == [i + 0.5 for i in range(19)]
    # 9 points -> window 1: unchanged
    assert smooth(_series([3, 1, 2, 5, 4, 0, 0, 1, 2])).tolist() == [3, 1, 2, 5, 4, 0, 0, 1, 2]


def test_final_and_best_use_the_same_trailing_window():
    # window 2 over 20 points; the pairs (1, 1) at steps 5-6 give the highest mean, 1.0;
    # final = (0.5 + 0.7) / 2 = 0.6; the lowest pair mean is (0 + 0) / 2 = 0
    values = [0] * 5 + [1, 1] + [0] * 11 + [0.5, 0.7]
    final, best = final_and_best(_series(values), "max")
    assert final == pytest.approx(0.6) and best == pytest.approx(1.0)
    assert final_and_best(_series(values), "min") == (pytest.approx(0.6), 0.0)
    assert final_and_best(_series(values), None) == (pytest.approx(0.6), None)
    # 3 evaluations -> window 1: final is the last, best the highest; NaNs are left out
    assert final_and_best(_series([0.2, math.nan, 0.9, 0.4]), "max") == (pytest.approx(0.4), pytest.approx(0.9))
    final, best = final_and_best(_series([]), "max")
    assert math.isnan(final) and math.isnan(best)


def test_mean_and_spread_is_the_sample_standard_deviation():
    # mean 0.7; deviations -0.2, 0, 0.2 -> sqrt((0.04 + 0 + 0.04) / (3 - 1)) = 0.2
    assert mean_and_spread([0.5, 0.7, 0.9]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert mean_and_spread([0.3]) == (0.3, 0.0)
    # NaN left out: [1, 3] -> mean 2, sqrt((1 + 1) / 1) = sqrt(2)
    assert mean_and_spread([math.nan, 1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert all(math.isnan(v) for v in mean_and_spread([math.nan]))


def test_seed_band_is_mean_min_max_on_the_steps_every_seed_logged():
    # seed A at steps 0-2: 1, 2, 3; seed B at steps 1-3: 3, 2, 1; common steps 1, 2: (2, 3) and (3, 2)
    band = seed_band([_series([1, 2, 3]), _series([3, 2, 1], start=1)])
    assert band.index.tolist() == [1, 2]
    assert band["mean"].tolist() == [2.5, 2.5]
    assert band["low"].tolist() == [2, 2] and band["high"].tolist() == [3, 3]
    assert seed_band([]).empty


def test_a_resumed_run_s_metrics_are_merged_later_version_winning(tmp_path):
    # version_0 logged steps 0-3, the run was resumed from its step-2 checkpoint into version_1 (steps 2-4);
    # version_10 sorts after version_2 by number, not by name.
    for version, steps, reward in ((0, [0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4]), (1, [2, 3, 4], [0.7, 0.8, 0.9])):
        folder = tmp_path / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        pd.DataFrame({"step": steps, "train/reward_mean": reward}).to_csv(folder / "metrics.csv", index=False)
    merged = metric_series(read_run_metrics(tmp_path), "train/reward_mean")
    assert merged.to_dict() == {0: 0.1, 1: 0.2, 2: 0.7, 3: 0.8, 4: 0.9}
    for version in (2, 10):
        folder = tmp_path / "csv" / f"version_{version}"
        folder.mkdir()
        pd.DataFrame({"step": [4], "train/reward_mean": [version / 100]}).to_csv(folder / "metrics.csv", index=False)
    assert metric_series(read_run_metrics(tmp_path), "train/reward_mean")[4] == 0.1


def test_the_loss_a_run_started_with_is_read_from_its_first_version_by_number(tmp_path):
    # Versions 0 and 1 deleted: version_2 is the first by number, though "version_10" < "version_2" by name.
    for version, loss in ((2, "archer.losses.GSPOLoss"), (10, "archer.losses.CISPOLoss")):
        folder = tmp_path / "csv" / f"version_{version}"
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"loss": {"class_path": loss}}}))
    (tmp_path / "csv" / "version_old").mkdir()  # not a Lightning version folder: ignored
    (tmp_path / "csv" / "version_old" / "config.yaml").write_text("not: a run config")
    assert loss_as_run(tmp_path) == "GSPOLoss"


def test_rewriting_the_plots_deletes_only_plots_it_writes(tmp_path, monkeypatch):
    import archer.compare as compare_module

    frame = pd.DataFrame({"step": [0, 1, 2], "train/reward_mean": [0.1, 0.2, 0.3], "val/aime/pass@1": [0.0, 0.5, 0.5]})
    monkeypatch.setattr(compare_module, "execute", lambda run, config, overrides: {"status": "done", "wall_s": 1.0})
    monkeypatch.setattr(compare_module, "read_run_metrics", lambda run_dir: frame)
    config = tmp_path / "base.yaml"
    config.write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    ours_stale = ["train_entropy.png", "val_math500_pass_at_4.png"]  # metrics an earlier comparison logged
    theirs = ["figure1.png", "train_reward_mean_annotated.png", "val_notes.png"]  # not plot names of compare
    for name in ours_stale + theirs:
        (out / name).write_bytes(b"png")
    compare_module.compare(config, [DAPO], 1, out)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        theirs + ["train_reward_mean.png", "val_aime_pass_at_1.png"])
    assert (out / "figure1.png").read_bytes() == b"png"


# ------------------------------------------------------------------------------------- runs and paths
def test_runs_go_seed_by_seed_and_variant_names_must_differ(tmp_path):
    runs = plan_runs([DAPO, GSPO], [0, 1], tmp_path)
    assert [(r.variant, r.seed) for r in runs] == [("dapo", 0), ("gspo", 0), ("dapo", 1), ("gspo", 1)]
    assert runs[3].dir == tmp_path / "runs" / "gspo" / "seed1"
    other = tmp_path / "other" / "dapo.yaml"
    other.parent.mkdir()
    other.write_text("{}")
    with pytest.raises(ValueError, match="dapo"):
        plan_runs([DAPO, other], [0], tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        plan_runs([tmp_path / "nope.yaml"], [0], tmp_path)


def test_paths_config_moves_every_output_into_the_run_folder(tmp_path):
    run_dir = tmp_path / "runs" / "dapo" / "seed0"
    trainer = paths_config(run_dir, [BASE, DAPO])["trainer"]
    assert trainer["default_root_dir"] == str(run_dir)
    assert trainer["logger"]["init_args"]["save_dir"] == str(run_dir)
    base_callbacks = yaml.safe_load(BASE.read_text())["trainer"]["callbacks"]
    assert len(trainer["callbacks"]) == len(base_callbacks)
    for written, base in zip(trainer["callbacks"], base_callbacks):
        if base["class_path"].endswith("ModelCheckpoint"):  # its other settings (interval, save_last) stay
            assert written["init_args"] == {**base["init_args"], "dirpath": str(run_dir / "checkpoints")}
        else:
            assert written == base


def test_loss_changes_shows_a_setting_carried_from_another_loss_class():
    resolved = {"class_path": "archer.losses.DAPOLoss",
                "init_args": {"clip": [0.2, 0.28], "dual_clip": 10.0, "loss_agg": "seq-mean-token-mean"}}
    assert loss_changes(resolved) == {"loss_agg": "seq-mean-token-mean"}
    assert loss_changes({"class_path": "archer.losses.GSPOLoss", "init_args": {"clip": [3e-4, 4e-4]}}) == {}


# ------------------------------------------------------------------------------------- end to end
def _table(summary: str) -> dict[tuple[str, str], list[str]]:
    rows = [line.strip("|").split("|") for line in summary.split("## Variants")[0].splitlines()
            if line.startswith("| ") and not line.startswith("| metric")]
    return {(cells[0].strip(), cells[1].strip()): [c.strip() for c in cells[2:]] for cells in rows}


def test_compare_two_variants_two_seeds_then_resume_past_a_failing_variant(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' torch: one thread, the reward worker has the other core
    sets = [f"model.model_path={tiny_model_dir}", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "data.train_size=64", "data.val_size=8"]
    argv = ["compare", str(BASE), "--variants", str(DAPO), str(GSPO), "--seeds", "2", "--out", "out",
            *(a for s in sets for a in ("--set", s))]
    main(argv)

    out = tmp_path / "out"
    for variant in ("dapo", "gspo"):
        for seed in (0, 1):
            run = out / "runs" / variant / f"seed{seed}"
            assert json.loads((run / "run.json").read_text())["status"] == "done"
            assert (run / "checkpoints" / "last.ckpt").is_file()  # the base config's paths were redirected
    assert not (tmp_path / "runs").exists()
    pngs = {p.name for p in out.glob("*.png")}
    assert {"train_reward_mean.png", "train_entropy.png", "train_response_length_mean.png", "train_clipfrac.png",
            "train_clipfrac_reasoning.png", "train_clipfrac_knowledge.png", "val_digit_copy_pass_at_1.png",
            "val_digit_copy_pass_at_4.png"} <= pngs

    summary = (out / "summary.md").read_text()
    table = _table(summary)
    for variant in ("dapo", "gspo"):
        for metric in ("train/reward_mean", "train/entropy", "train/clipfrac", "val/digit_copy/pass@1"):
            assert table[(metric, variant)][-1] == "2", (metric, variant)  # both seeds aggregated
        # 2 logged steps -> window 1: final = the last step's value of each seed, then mean ± std over seeds
        last = [metric_series(read_run_metrics(out / "runs" / variant / f"seed{s}"), "train/entropy").iloc[-1]
                for s in (0, 1)]
        mean, spread = mean_and_spread(last)
        assert table[("train/entropy", variant)][0] == f"{mean:.3g} ± {spread:.2g}"
        assert table[("train/entropy", variant)][1] == "–"  # no "best" for a descriptive metric
    assert "| dapo | " in summary.split("## Variants")[1] and "| DAPOLoss |" in summary  # no carried settings

    # Again with a variant whose runs fail, first: the finished run is skipped, the failure reported.
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  update: {ppo_epochs: 0}\n")
    record = (out / "runs" / "dapo" / "seed0" / "run.json").read_text()
    argv = ["compare", str(BASE), "--variants", str(broken), str(DAPO), "--seeds", "1", "--out", "out",
            *(a for s in sets for a in ("--set", s))]
    with pytest.raises(SystemExit, match="broken seed 0"):
        main(argv)
    assert (out / "runs" / "dapo" / "seed0" / "run.json").read_text() == record
    assert "ppo_epochs >= 1" in (out / "runs" / "broken" / "seed0" / "output.log").read_text()
    summary = (out / "summary.md").read_text()
    assert "| broken | 0 | failed |" in summary
    table = _table(summary)
    assert table[("train/reward_mean", "dapo")][-1] == "1" and table[("train/reward_mean", "broken")][-1] == "0"
