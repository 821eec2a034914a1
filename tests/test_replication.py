"""The replication summary (mda.evaluate.replication) on a constructed `dvc exp show --json`: the layout DVC
3 writes (commit rows, each with `experiments` → `revs` → `data` → params/metrics files → data),
three pretraining seeds, one failed experiment."""

import json

import pytest

from mda.evaluate.replication import exp_rows, main, report


def evaluation(emergence, top, rand, aug, aug_rand, p_top, p_aug, test, r, p_r, window=(3500, 6000), k=4000):
    delay = lambda m, lo, hi: {"delay": {"mean": m, "ci_low": lo, "ci_high": hi},
                               "delta_score": {"mean": -0.1, "ci_low": -0.2, "ci_high": 0.0}}
    return {"k": k, "window_start": window[0], "window_end": window[1], "missing_runs": 0,
            "baseline": {"emergence_step": emergence, "score_end": 0.83, "icl_end": -2.1},
            "arms": {"remove-top": delay(*top), "remove-random": delay(*rand), "augment-top": delay(*aug),
                     "augment-random": delay(*aug_rand)},
            "targeted_vs_random": {"remove-top": {"remove-random": {"p_delay": p_top, "p_rank_delay": 0.25,
                                                                    "p_t_delay": p_top, "test": test, "random_sets": 3}},
                                   "augment-top": {"augment-random": {"p_delay": p_aug, "test": test, "random_sets": 3}}},
            "icl_coupling": {"pearson_r": r, "p_value": p_r},
            "verdicts": {"Removing beats random": "supported (exploratory)" if p_top <= 0.05 else "not shown"}}


def rev(name, sha, seed, ev, target="L2H2", error=None):
    data = {"rev": sha, "timestamp": "2026-11-27T12:00:00",
            "params": {"params.yaml": {"data": {"model": {"init_seed": seed, "layers": 3}}}},
            "metrics": {} if ev is None else {"metrics/evaluate.json": {"data": ev},
                                              "metrics/locate.json": {"data": {"targets": [target]}}},
            "deps": {}, "outs": {}, "meta": {}}
    return {"rev": sha, "name": name, "data": data, "error": error, "experiments": None}


def exp_show():
    main = rev("main", "a" * 40, 0, evaluation(4258, (302, 271, 333), (30, -6, 67), (-6, -23, 11),
                                               (-11, -55, 34), 0.0026, 0.6, "t", 0.83, 0.005))
    main["experiments"] = [
        {"revs": [rev("init-seed-1", "b" * 40, 1, evaluation(4100, (236, 200, 270), (25, 0, 50), (-40, -60, -20),
                                                             (5, -10, 20), 0.03, 0.04, "t", 0.5, 0.2,
                                                             window=(4000, 5500), k=2400), target="L2H1")],
         "executor": None, "name": "init-seed-1"},
        {"revs": [rev("init-seed-2", "c" * 40, 2, evaluation(3900, (20, -10, 50), (40, 10, 70), (3, -5, 11),
                                                             (-2, -9, 5), 0.7, float("nan"), "t", -0.1, 0.8))],
         "executor": None, "name": "init-seed-2"},
        {"revs": [rev("init-seed-3", "d" * 40, 3, None, error={"type": "ReproductionError", "msg": "failed"})],
         "executor": None, "name": "init-seed-3"}]
    workspace = rev(None, "workspace", 2, evaluation(1, (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), 1, 1, "t", 0, 1))
    workspace["rev"] = "workspace"
    return [workspace, main]


def test_rows_flatten_commits_and_experiments():
    rows = exp_rows(exp_show())
    assert [r["name"] for r in rows] == ["main", "init-seed-1", "init-seed-2", "init-seed-3"]
    assert rows[1]["params"]["params.yaml"]["model"]["init_seed"] == 1
    assert [r["name"] for r in exp_rows(exp_show(), include_workspace=True)][0] == "workspace"


def test_table_puts_the_headline_effects_side_by_side():
    text = report(exp_show())
    lines = text.splitlines()
    assert lines[0] == ("| experiment | init seed | target | window | k | baseline emergence | remove-top delay | "
                        "remove-random delay | augment-top delay | augment-random delay | p remove-top vs remove-random | "
                        "p augment-top vs augment-random | ICL r (p) |")
    assert lines[2] == ("| main | 0 | L2H2 | 3,500 → 6,000 | 4,000 | 4,258 | +302 [+271, +333] | +30 [-6, +67] | "
                        "-6 [-23, +11] | -11 [-55, +34] | 0.0026 (t, K = 3) | 0.6 (t, K = 3) | +0.83 (0.005) |")
    assert lines[3] == ("| init-seed-1 | 1 | L2H1 | 4,000 → 5,500 | 2,400 | 4,100 | +236 [+200, +270] | "
                        "+25 [+0, +50] | -40 [-60, -20] | +5 [-10, +20] | 0.03 (t, K = 3) | 0.04 (t, K = 3) | "
                        "+0.50 (0.2) |")
    assert lines[4].startswith("| init-seed-2 | 2 | L2H2 |") and \
        lines[4].endswith("| 0.7 (t, K = 3) | — | -0.10 (0.8) |")
    assert len([l for l in lines[:lines.index("")] if l.startswith("| ")]) == 5  # header, rule, three experiments
    # remove-top beyond remove-random: 302 > 30, 236 > 25, 20 < 40 → 2 of 3; p ≤ 0.05 in 2.
    assert "- `remove-top` moved emergence later than `remove-random` in 2 of 3 experiments; p ≤ 0.05 in 2 of 3." \
        in lines
    # augment-top earlier than augment-random: −6 < −11? no; −40 < 5 yes; 3 < −2 no → 1 of 3; p ≤ 0.05 in 1.
    assert "- `augment-top` moved emergence earlier than `augment-random` in 1 of 3 experiments; p ≤ 0.05 in 1 of 3." \
        in lines
    # the claims table: the verdict per experiment, and the count of "supported" (exploratory included)
    assert "| claim | main | init-seed-1 | init-seed-2 | supported in |" in lines
    assert "| Removing beats random | supported (exploratory) | supported (exploratory) | not shown | 2 of 3 |" in lines
    assert "- Not summarised: init-seed-3 (error: {'type': 'ReproductionError', 'msg': 'failed'})." in lines


def test_cli_reads_a_saved_json_and_fails_in_one_line(tmp_path, capsys):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(exp_show()))
    out = tmp_path / "replication.md"
    main(["--input", str(path), "--out", str(out), "--names", "main", "init-seed-2"])
    rows = [l for l in out.read_text().split("\n\n")[0].splitlines() if l.startswith("| ")]  # the first table
    assert len(rows) == 4 and rows[2].startswith("| main |") and rows[3].startswith("| init-seed-2 |")
    path.write_text(json.dumps([rev("main", "a" * 40, 0, None)]))
    with pytest.raises(SystemExit) as exit_:
        main(["--input", str(path)])
    assert exit_.value.code == 1 and capsys.readouterr().err.strip() == \
        "error: dvc exp show: no experiment has metrics/evaluate.json (skipped: main (no metrics/evaluate.json))"


def test_experiment_folders_give_the_same_rows_as_dvc_exp_show(tmp_path, capsys):
    """`--dirs results/<name> …`: each folder's params.yaml and metrics/*.json, named after the folder."""
    import yaml

    commit = exp_show()[1]
    runs = [commit] + [e["revs"][0] for e in commit["experiments"][:2]]
    folders = []
    for name, row in zip(["default", "init-seed-1", "init-seed-2"], runs):
        folder = tmp_path / name
        (folder / "metrics").mkdir(parents=True)
        data = row["data"]
        (folder / "params.yaml").write_text(yaml.safe_dump(data["params"]["params.yaml"]["data"]))
        for file, content in data["metrics"].items():
            (folder / file).write_text(json.dumps(content["data"]))
        folders.append(str(folder))
    out = tmp_path / "replication.md"
    main(["--dirs", *folders, "--out", str(out)])
    from_folders = out.read_text().splitlines()
    from_exp = report(exp_show()).splitlines()
    assert from_folders[2] == from_exp[2].replace("| main |", "| default |", 1)
    assert from_folders[3:5] == from_exp[3:5]
    assert from_folders[-1] == f"- Made by `python -m mda.evaluate.replication --dirs {' '.join(folders)}`."
    (tmp_path / "default" / "metrics" / "evaluate.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["--dirs", *folders])
    assert "default/metrics/evaluate.json: not valid JSON" in capsys.readouterr().err
