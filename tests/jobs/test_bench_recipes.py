"""bench recipes: the suite's TorchDEQ recipe follows a plain torchdeq loop step for step."""

import json
from pathlib import Path

import pytest

from jobs.bench import recipes

REPO = Path(__file__).resolve().parents[2]


def test_suite_torchdeq_recipe_matches_the_plain_loop(tmp_path, capsys):
    cfg = {"size": 41, "input_scale": 16.0, "hidden": 32, "seeds": [0], "eval_every": 4, "target_db": 20.0,
           "out": str(tmp_path / "r.json"), "figure": str(tmp_path / "r.png"),
           "reference": {"steps": 8, "f_max_iter": 30},
           "recipes": {"torchdeq": {"experiment": str(REPO / "configs/experiments/deq_inr_torchdeq.yaml"), "steps": 8,
                                    "set": {"deq.f_max_iter": 30, "deq.eval_max_iter": 30},
                                    "compare_with_reference": True},
                       "ift": {"experiment": str(REPO / "configs/experiments/deq_inr_ift.yaml"), "steps": 4}}}
    assert recipes.main(cfg) == 0
    out = json.loads(Path(cfg["out"]).read_text())
    ref, suite = out["runs"]["reference loop (torchdeq)"][0], out["runs"]["torchdeq"][0]
    assert [s for s, _, _ in ref["curve"]] == [s for s, _, _ in suite["curve"]] == [4, 8]
    # same init, same recipe: the same PSNR curve up to float rounding
    assert [p for _, _, p in suite["curve"]] == pytest.approx([p for _, _, p in ref["curve"]], abs=1e-3)
    rows = {r["recipe"]: r for r in out["summary"]}
    assert rows["torchdeq"]["ratio_step"] > 0 and rows["torchdeq"]["ratio_cpu"] > 0 and rows["ift"]["steps"] == 4
    assert Path(cfg["figure"]).stat().st_size > 1000
    assert "torchdeq / reference loop:" in capsys.readouterr().out


def test_unknown_key_is_refused():
    with pytest.raises(ValueError, match="unknown key"):
        recipes.main({"sizes": 3})


def test_reuse_takes_finished_runs_from_an_earlier_measurement(tmp_path, capsys):
    first = {"size": 41, "input_scale": 16.0, "hidden": 16, "seeds": [3], "eval_every": 2,
             "out": str(tmp_path / "a.json"), "figure": str(tmp_path / "a.png"), "reference": {"steps": 2}}
    assert recipes.main(first) == 0
    again = {**first, "out": str(tmp_path / "b.json"), "reuse": first["out"]}
    assert recipes.main(again) == 0
    assert "reused from" in capsys.readouterr().out
    a, b = (json.loads(Path(p).read_text())["runs"] for p in (first["out"], again["out"]))
    assert a == b


def test_step_probe_times_every_recipe(capsys):
    cfg = {"size": 41, "input_scale": 16.0, "hidden": 16, "probe_reps": 3,
           "recipes": {"a": {"experiment": str(REPO / "configs/experiments/deq_inr.yaml")},
                       "b": {"experiment": str(REPO / "configs/experiments/deq_inr_torchdeq.yaml")}}}
    assert recipes.main(cfg) == 0
    out = capsys.readouterr().out
    assert "s/step (side by side)" in out and "\na " in out and "\nb " in out
