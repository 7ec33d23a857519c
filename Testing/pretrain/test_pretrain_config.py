"""Configuration: YAML/JSON, overrides, unknown keys and wrong types named in one-line errors, the
script's exit codes and its Slicer-style argument separator."""
import json

import pytest

from hssl.errors import HSSLError
from hssl.pretrain.cli import script_args
from hssl.pretrain.config import PretrainConfig, build_config, load_config, parse_override
from pretrain_helpers import REPO, run_script, write_config


def test_defaults_validate_and_the_fingerprint_ignores_per_run_budgets():
    cfg = build_config({})
    assert cfg.model.channels == [16, 32, 64, 128, 256] and cfg.model.strides[1] == [1, 2, 2]
    other = build_config({"train": {"time_budget": 60.0, "stop_at_step": 5, "device": "cpu"}, "output_dir": "x"})
    assert other.fingerprint() == cfg.fingerprint()
    assert build_config({"loss": {"temperature": 0.1}}).fingerprint() != cfg.fingerprint()


def test_yaml_json_and_overrides(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.yaml").write_text("train:\n  max_steps: 12\nloss:\n  w_task: 0.0\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["train.max_steps=40", "data.crop_size=[16, 32, 32]",
                                                   "export.name=abc", "loss.temperature=0.5"])
    assert (cfg.train.max_steps, cfg.loss.w_task, cfg.data.crop_size, cfg.export.name) == (40, 0.0, [16, 32, 32], "abc")
    assert isinstance(cfg.loss.temperature, float)
    write_config(tmp_path / "c.json", {"train": {"max_steps": 3}})
    assert load_config(str(tmp_path / "c.json"), []).train.max_steps == 3
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2]) and parse_override("a=hello") == ("a", "hello")


@pytest.mark.parametrize("tree, message", [
    ({"trian": {}}, "unknown config key 'trian' (did you mean 'train'?)"),
    ({"train": {"max_step": 3}}, "unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"),
    ({"loss": {"temperature": "warm"}}, "config key 'loss.temperature' must be float, got 'warm'"),
    ({"train": {"batch_size": 1.5}}, "config key 'train.batch_size' must be int"),
    ({"data": {"crop_size": [8, 50, 48]}}, "must be a multiple of the network's total stride"),
    ({"loss": {"w_image": 0, "w_task": 0, "w_group": 0, "w_restore": 0}}, "every loss weight is 0"),
    ({"model": {"heads_on": ["middle"]}}, "model.heads_on"),
    ({"data": {"sources": []}}, "data.sources is empty"),
])
def test_bad_configs_name_the_problem(tree, message):
    with pytest.raises(HSSLError) as err:
        build_config(tree)
    assert message in str(err.value)


def test_script_arguments_after_the_slicer_separator():
    assert script_args(["--python-script", "x", "--", "--config", "c.yaml"]) == ["--config", "c.yaml"]
    assert script_args(["--config", "c.yaml"]) == ["--config", "c.yaml"]


def test_script_errors_are_one_line_without_traceback(tmp_path):
    write_config(tmp_path / "bad.json", {"train": {"max_stepz": 3}})
    proc = run_script("--", "--config", str(tmp_path / "bad.json"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'train.max_stepz' (did you mean 'train.max_steps'?)"
    empty = tmp_path / "empty"
    empty.mkdir()
    write_config(tmp_path / "empty.json", {"output_dir": str(tmp_path / "out"),
                                           "data": {"sources": [{"kind": "folder", "path": str(empty)}]}})
    proc = run_script("--config", str(tmp_path / "empty.json"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the catalog is empty")


def test_the_repository_configs_are_valid():
    pytest.importorskip("yaml")
    for path in sorted((REPO / "configs").glob("pretrain_*.yaml")):
        cfg = load_config(str(path), [])
        assert isinstance(cfg, PretrainConfig) and cfg.train.max_steps > 0, path
    assert json.loads(json.dumps(load_config(str(REPO / "configs" / "pretrain_small.yaml")).to_json()))
