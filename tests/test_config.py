"""Config loading: shipped YAMLs load, mistakes name their key and file, overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from mtkit.config import RunConfig, config_from_dict, config_to_dict, load_config, save_config
from mtkit.errors import UserError

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text, encoding="utf-8")
    return path


MINIMAL = "data:\n  splits: {train: 'train.{lang}', valid: 'val.{lang}'}\n"


def test_the_paper_multi30k_and_quickstart_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"transformer_base.yaml", "transformer_big.yaml", "multi30k_de_en.yaml",
            "multi30k_en_de.yaml", "quickstart_cpu.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_sets_every_key(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load(path.read_text())
    # shipped configs are complete: every field written out, nothing left to hidden defaults
    for section, fields in config_to_dict(cfg).items():
        assert set(fields) == set(raw[section]), f"{path.name}: section {section} is incomplete"


def test_paper_configs_have_table_3_dimensions():
    base, big = (load_config(ROOT / "configs/transformer_base.yaml"),
                 load_config(ROOT / "configs/transformer_big.yaml"))
    assert (base.model.d_model, base.model.d_ff, base.model.n_heads, base.model.n_layers) == (512, 2048, 8, 6)
    assert (big.model.d_model, big.model.d_ff, big.model.n_heads, big.model.dropout) == (1024, 4096, 16, 0.3)
    for cfg in (base, big):
        assert cfg.train.adam_betas == (0.9, 0.98) and cfg.train.adam_eps == 1e-9
        assert cfg.train.warmup_steps == 4000 and cfg.train.label_smoothing == 0.1
        assert cfg.decode.beam_size == 4 and cfg.decode.length_penalty == 0.6


def test_unknown_key_names_itself_the_file_and_a_suggestion(tmp_path):
    path = write(tmp_path, MINIMAL + "model:\n  layers: 3\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "model.layers" in message and "n_layers" in message
    assert "\n" not in message


def test_wrong_types_are_all_reported_at_once(tmp_path):
    path = write(tmp_path, MINIMAL + "model:\n  d_model: big\n  dropout: high\ntrain:\n  max_tokens: 1.5\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    for key in ("model.d_model", "model.dropout", "train.max_tokens"):
        assert key in str(err.value)


def test_missing_required_split_is_named(tmp_path):
    path = write(tmp_path, "data:\n  splits: {train: 'train.{lang}'}\n")
    with pytest.raises(UserError, match="data.splits.valid is required"):
        load_config(path)


def test_bad_literal_and_constraint(tmp_path):
    path = write(tmp_path, MINIMAL + "model:\n  norm: middle\n  d_model: 10\n  n_heads: 3\n")
    with pytest.raises(UserError, match="model.norm"):
        load_config(path)
    path = write(tmp_path, MINIMAL + "model:\n  d_model: 10\n  n_heads: 3\n")
    with pytest.raises(UserError, match="divisible"):
        load_config(path)


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "data:\n  splits: [unclosed\n")
    with pytest.raises(UserError, match=r"run.yaml: line \d+"):
        load_config(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(UserError, match="nothere.yaml: config file not found"):
        load_config(tmp_path / "nothere.yaml")


def test_overrides_apply_with_yaml_types_and_unknown_ones_are_rejected(tmp_path):
    path = write(tmp_path, MINIMAL)
    cfg = load_config(path, ["model.n_layers=3", "train.clip_norm=1", "model.norm=pre",
                             "train.patience=null"])
    assert cfg.model.n_layers == 3 and cfg.train.clip_norm == 1.0 and cfg.model.norm == "pre"
    assert cfg.train.patience is None
    with pytest.raises(UserError, match="model.n_layer'"):
        load_config(path, ["model.n_layer=3"])
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_config(path, ["model.n_layers"])


def test_an_override_that_opens_a_list_but_is_not_yaml_names_the_yaml_problem(tmp_path):
    path = write(tmp_path, MINIMAL)
    unquoted = 'data.corpora=[{src_lang: de}, {src_lang: fr, splits: {train: train.{lang}.gz}}]'
    with pytest.raises(UserError, match=r"--set 'data\.corpora=.*the value is not valid YAML at character 55 "
                                        r"\(expected ',' or '\}', but got '\{'\); quote a value with braces"):
        load_config(path, [unquoted])
    with pytest.raises(UserError, match=r"not valid YAML at character 6 \(expected ',' or '\]'"):
        load_config(path, ["data.corpora=[1, 2"])
    quoted = load_config(path, [unquoted.replace("train.{lang}.gz", '"train.{lang}.gz"')])
    assert [c.src_lang for c in quoted.data.corpora] == ["de", "fr"]
    assert quoted.data.corpora[1].splits["train"] == "train.{lang}.gz"
    # text that is not YAML and opens no list or mapping is still taken as the text it is
    assert load_config(path, ["train.run_dir=@runs/a: b"]).train.run_dir == "@runs/a: b"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["model.d_model=64", "model.n_heads=4"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_zero_heads_is_an_error_line_not_a_division_by_zero():
    raw = config_to_dict(RunConfig())
    raw["data"]["splits"] = {"train": "train.{lang}", "valid": "valid.{lang}"}
    raw["model"]["n_heads"] = 0
    with pytest.raises(UserError, match=r"model.n_heads must be >= 1, got 0"):
        config_from_dict(raw)


@pytest.mark.parametrize("key, value", [("train.threads", -1), ("train.threads", 0),
                                        ("data.max_tokens_per_sentence", 0)])
def test_a_count_below_one_is_an_error_line_naming_the_key(tmp_path, key, value):
    with pytest.raises(UserError, match=rf"{key} must be >= 1, got {value}"):
        load_config(write(tmp_path, MINIMAL), [f"{key}={value}"])


@pytest.mark.parametrize("max_steps", [100, 4000])
def test_linear_decay_needs_max_steps_above_the_warmup(tmp_path, max_steps):
    sets = ["train.lr_decay=linear", f"train.max_steps={max_steps}", "train.warmup_steps=4000"]
    expected = (rf"train\.lr_decay linear falls to 0 at train\.max_steps \({max_steps}\), "
                r"which must be above train\.warmup_steps \(4000\)")
    with pytest.raises(UserError, match=expected):
        load_config(write(tmp_path, MINIMAL), sets)
    fits = load_config(write(tmp_path, MINIMAL), [sets[0], "train.max_steps=4001", sets[2]])
    assert fits.train.max_steps == 4001 and fits.train.lr_decay == "linear"
    with pytest.raises(UserError, match=r"train\.lr_decay"):
        load_config(write(tmp_path, MINIMAL), ["train.lr_decay=cosine"])
