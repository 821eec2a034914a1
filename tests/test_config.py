from pathlib import Path

import pytest
import yaml

from mda.core.config import load_params
from mda.core.errors import ConfigError
from tests.conftest import REPO, run_stage


def write(tmp_path, data) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_repo_params_and_presets_are_valid(tmp_path):
    load_params(REPO / "params.yaml")
    for preset in (REPO / "presets").glob("*.yaml"):
        raw = yaml.safe_load(preset.read_text())
        if raw["corpus"]["source"] == "pythia":  # the user sets the data path (tests/test_pythia_shapes.py)
            raw["corpus"]["pythia"]["path"] = "/data/pile"
        (tmp_path / preset.name).write_text(yaml.safe_dump(raw))
        load_params(tmp_path / preset.name)


@pytest.mark.parametrize("data, needle", [
    ({"corpus": {"sedd": 1}}, "corpus.sedd: unknown key"),
    ({"bogus": {}}, "bogus: unknown key"),
    ({"corpus": {"batch_size": "many"}}, "corpus.batch_size"),
    ({"corpus": {"batch_size": 0}}, "corpus.batch_size: Input should be greater than or equal to 1"),
    ({"pretrain": {"lr": -1}}, "pretrain.lr"),
    ({"model": {"hidden_size": 30, "heads": 4}}, "not divisible"),
    ({"corpus": {"synthetic": {"mix": {"poetry": 1.0}}}}, "corpus.synthetic.mix.poetry"),
    ({"corpus": {"seq_len": 512}}, "exceeds model.max_position_embeddings"),
    ({"corpus": {"source": "pythia"}}, "corpus.pythia.path is required"),
    ({"model": {"hub": {"size": "13m"}}}, "model.hub.size: Input should be '14m', '31m', '70m', '160m', '410m', "
                                          "'1b', '1.4b', '2.8b', '6.9b' or '12b' (got '13m')"),
])
def test_bad_params_name_the_key(tmp_path, data, needle):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, data))
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(write(tmp_path, "corpus: [unclosed"))


@pytest.mark.parametrize("size", ["14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b"])
def test_every_published_pythia_size_is_accepted(tmp_path, size):
    """As YAML spells them (unquoted `1.4b`, `12b`): each is one of EleutherAI's Pythia models."""
    params = load_params(write(tmp_path, f"model:\n  source: hub\n  hub:\n    size: {size}\n"))
    assert params.model.hub.repo_id == f"EleutherAI/pythia-{size}"


def test_empty_params_file_stops_the_stage_with_one_line(pipeline_repo):
    """An empty params.yaml (or one of comments only) would otherwise run every stage on the
    schema's defaults without a word."""
    files = lambda: sorted(p.relative_to(pipeline_repo) for p in pipeline_repo.rglob("*") if "__pycache__" not in p.parts)
    before = files()
    for text in ("", "# params.yaml\n\n# (all commented out)\n"):
        (pipeline_repo / "params.yaml").write_text(text)
        res = run_stage(pipeline_repo, "corpus")
        assert res.returncode == 2
        assert res.stderr.strip().splitlines() == [
            "error: params.yaml: empty (no sections); every stage reads its settings from this file"]
        assert files() == before  # nothing written: no data/, no metrics/, no mlflow.db


def test_stage_exits_2_and_writes_nothing(pipeline_repo):
    params = yaml.safe_load((pipeline_repo / "params.yaml").read_text())
    params["corpus"]["sed"] = 3
    (pipeline_repo / "params.yaml").write_text(yaml.safe_dump(params))
    res = run_stage(pipeline_repo, "corpus")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == ["error: params.yaml: corpus.sed: unknown key"]
    assert not (pipeline_repo / "data").exists()


def test_schema_defaults_match_params_yaml():
    from mda.core.config import Params

    assert Params() == load_params(REPO / "params.yaml")


def test_quick_preset_is_a_complete_params_file():
    """dvc.yaml's matrices read `retrain.*` from params.yaml itself, so a preset must spell out
    every section, not lean on the schema's defaults."""
    preset = yaml.safe_load((REPO / "presets/quick.yaml").read_text())
    assert set(preset) == set(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert load_params(REPO / "presets/quick.yaml").corpus.steps == 200


def test_power_preset_is_the_default_with_19_random_sets():
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    power = yaml.safe_load((REPO / "presets/power.yaml").read_text())
    assert power["retrain"]["seeds"] == list(range(19))
    power["retrain"]["seeds"] = default["retrain"]["seeds"]
    assert power == default


def test_lds_preset_is_the_default_with_the_lds_stage_on():
    default = yaml.safe_load((REPO / "params.yaml").read_text())
    preset = yaml.safe_load((REPO / "presets/lds.yaml").read_text())
    assert default["lds"]["enabled"] is False and preset["lds"]["enabled"] is True
    assert preset["lds"]["subsets"] >= 32
    preset["lds"]["enabled"] = False
    assert preset == default


@pytest.mark.parametrize("seed, run_seed, key", [
    (0, 1, "locate.probe.seed"),          # 0 + 1 = locate's seed 1: the probe that chose head and window
    (0, 2, "influence.probe_seed"),       # the probe the scores were computed on
    (2, 3, "influence.overlap_seeds"),    # 2 + 3 = 5, one of the other scored draws
    (2 ** 32 + 1, 0, "locate.probe.seed"),  # torch keeps a seed's low 32 bits: 2**32 + 1 draws as 1
])
def test_evaluation_probe_seeds_may_not_reuse_a_probe_that_chose_or_scored(tmp_path, seed, run_seed, key):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["retrain"]["probe"]["seed"], raw["retrain"]["seeds"] = seed, [run_seed]
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, raw))
    assert str(err.value).startswith(f"{tmp_path / 'params.yaml'}: retrain.probe.seed: the evaluation probe of run "
                                     f"seed {run_seed}") and f"is also a probe seed in {key}" in str(err.value)


def test_evaluation_probes_share_no_sequence_with_the_probes_that_chose_and_scored():
    """The default's evaluation probes (K = 19 run seeds) against locate's probe and every influence
    draw, row by row — before the namespace, run seed 1's probe was the influence probe's first 32
    sequences (same generator, same seed)."""
    from types import SimpleNamespace

    from mda.core.config import ProbeSettings
    from mda.units.probes import probe_tokens
    from mda.units.probes import evaluation_probes

    params = load_params(REPO / "presets/power.yaml")
    config = SimpleNamespace(vocab_size=2067, bos_token_id=0, eos_token_id=1)
    rows = lambda t: {tuple(r) for r in t.tolist()}
    evaluation = set().union(*(rows(t) for t in evaluation_probes(params, config, None, params.retrain.seeds).values()))
    inf = params.influence
    chose_or_scored = rows(probe_tokens(params.locate.probe, config, None))
    for seed in [inf.probe_seed, *inf.overlap_seeds]:
        chose_or_scored |= rows(probe_tokens(ProbeSettings(sequences=inf.probe_sequences, half_len=inf.probe_half_len,
                                                           seed=seed), config, None))
    assert len(evaluation) == 19 * params.retrain.probe.sequences
    assert not evaluation & chose_or_scored
    # the old rule (locate's seed + run seed) would have shared run seed 1's whole probe with the scores' draw
    old = rows(probe_tokens(ProbeSettings(sequences=32, half_len=32, seed=params.locate.probe.seed + 1), config, None))
    assert old <= chose_or_scored
