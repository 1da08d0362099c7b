"""Model cards: the Hub's front matter (languages, datasets, a model-index of real `mtkit evaluate --json`
scores with their signatures), figures taken from the checkpoint and the run's log, and one-line errors
for evaluation files that are not what `mtkit evaluate --json` writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import untrained_checkpoint
from mtkit.card import Evaluation, card_text, count_parameters, read_evaluation
from mtkit.checkpoint import load_checkpoint
from mtkit.cli import app
from mtkit.config import config_from_dict
from mtkit.errors import UserError
from mtkit.model import Transformer

HYPS = ["The dog runs in the park .", "A man sits on a red bench", "Two women talk"]
REFS = ["The dog is running in the park.", "A man is sitting on a red bench.", "Two women are talking."]


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> dict:
    """A real checkpoint dict: an untrained model on a prepared synthetic corpus (xx -> yy)."""
    return load_checkpoint(untrained_checkpoint(tmp_path_factory.mktemp("card")))


@pytest.fixture
def eval_file(tmp_path) -> Path:
    """What `mtkit evaluate --json` prints, as a user redirects it to a file."""
    ref, hyp = tmp_path / "ref.txt", tmp_path / "hyp.txt"
    ref.write_text("".join(f"{line}\n" for line in REFS), encoding="utf-8")
    hyp.write_text("".join(f"{line}\n" for line in HYPS), encoding="utf-8")
    proc = CliRunner().invoke(app, ["evaluate", "--ref", str(ref), "--hyp", str(hyp), "--json"])
    assert proc.exit_code == 0, proc.output
    path = tmp_path / "eval.json"
    path.write_text(proc.stdout, encoding="utf-8")
    return path


def split_card(text: str) -> tuple[dict, str]:
    """(front matter as the Hub's YAML reader sees it, body)."""
    assert text.startswith("---\n")
    header, sep, body = text[4:].partition("\n---\n")
    assert sep, "front matter not closed"
    return yaml.safe_load(header), body


def with_config(state: dict, **sections) -> dict:
    """The state with config sections updated (a copy; the module's state stays as it is)."""
    config = copy.deepcopy(state["config"])
    for section, changes in sections.items():
        config[section].update(changes)
    return {**state, "config": config}


def test_front_matter_holds_the_evaluation_scores_and_signatures(state, eval_file, tmp_path):
    printed = json.loads(eval_file.read_text(encoding="utf-8"))
    ev = read_evaluation(f"multi30k-test2016={eval_file}")
    assert (ev.dataset, ev.bleu, ev.chrf, ev.ter, ev.n_sentences) == (
        "multi30k-test2016", printed["bleu"], printed["chrf"], printed["ter"], 3)
    checkpoint = tmp_path / "de-en-base" / "checkpoints" / "best.pt"
    text = card_text(state, checkpoint, "transformers", [ev], license="cc-by-4.0")
    meta, body = split_card(text)
    assert meta["language"] == ["xx", "yy"] and meta["license"] == "cc-by-4.0"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "translation"
    assert meta["tags"][0] == "translation" and "mtkit" in meta["tags"] and "ctranslate2" not in meta["tags"]
    assert meta["datasets"] == [Path(state["config"]["data"]["dir"]).name]
    assert meta["metrics"] == ["bleu", "chrf"]
    [model] = meta["model-index"]
    assert model["name"] == "de-en-base"
    [result] = model["results"]
    assert result["task"] == {"type": "translation", "name": "Translation xx-yy"}
    assert result["dataset"]["name"] == "multi30k-test2016"
    metrics = {m["type"]: m for m in result["metrics"]}
    for key in ("bleu", "chrf", "ter"):
        assert metrics[key]["value"] == printed[key]
        assert metrics[key]["args"] == {"signature": printed["signature"][key]}
        assert f"`{printed['signature'][key]}`" in body
    assert f"| multi30k-test2016 | 3 | {printed['bleu']:.2f} | {printed['chrf']:.2f} |" in body
    assert "bleu_lc" not in text  # the lowercased BLEU is not comparable: never on a card


def test_without_evaluations_no_model_index_and_the_body_says_how_to_add_one(state, tmp_path):
    text = card_text(state, tmp_path / "run" / "checkpoints" / "best.pt", "transformers")
    meta, body = split_card(text)
    assert "model-index" not in meta and meta["license"] == "unknown"
    assert "--json > eval.json" in body and "--format hf --eval NAME=eval.json" in body


def test_several_corpora_list_every_language_and_dataset_once(state, tmp_path):
    corpora = [{"src_lang": "de", "tgt_lang": "en"}, {"src_lang": "en", "tgt_lang": "de"},
               {"src_lang": "fr", "tgt_lang": "en", "format": "hub", "hub_name": "wmt14",
                "hub_config": "fr-en"},
               {"name": "bt", "src_lang": "fr", "tgt_lang": "en", "tag": "<BT>"}]
    multi = with_config(state, data={"corpora": corpora})
    text = card_text(multi, tmp_path / "m.pt", "transformers", [Evaluation("t", 30.0, None, {}, None)])
    meta, body = split_card(text)
    assert meta["language"] == ["de", "en", "fr"]
    assert meta["datasets"] == [Path(state["config"]["data"]["dir"]).name, "wmt14", "bt"]
    assert meta["model-index"][0]["results"][0]["task"]["name"] == "Translation de-en, en-de, fr-en"
    assert [m["type"] for m in meta["model-index"][0]["results"][0]["metrics"]] == ["bleu"]
    assert "`<BT>`" in body


def test_a_language_code_that_yaml_reads_as_a_boolean_stays_a_string(state, tmp_path):
    meta, _ = split_card(card_text(with_config(state, data={"src_lang": "no"}), tmp_path / "m.pt",
                                   "transformers"))
    assert meta["language"] == ["no", "yy"]


def test_ctranslate2_engine(state, tmp_path):
    meta, body = split_card(card_text(state, tmp_path / "m.pt", "ctranslate2"))
    assert meta["library_name"] == "ctranslate2" and "ctranslate2" in meta["tags"]
    assert meta["tags"][0] == "translation"
    assert 'ctranslate2.Translator("MODEL_DIR")' in body and "MODEL_DIR/source.spm" in body
    assert "ct2_translate" in body and "--format ctranslate2 --eval" in body


def test_parameter_count_counts_each_tied_matrix_once(state, tmp_path):
    cfg = config_from_dict(state["config"])
    vocab = state["model"]["src_embed.tokens.weight"].shape[0]
    expected = sum(p.numel() for p in Transformer(cfg.model, vocab, vocab).parameters())
    # averaging writes each name's own tensor: the tie is in the config, no longer in the storage
    averaged = {**state, "model": {k: v.clone() for k, v in state["model"].items()}, "averaged": ["a", "b"]}
    for s in (state, averaged):
        assert f"; {expected:,} parameters." in card_text(s, tmp_path / "m.pt", "transformers")
    separate = with_config(state, model={"share_embeddings": False, "output_bias": True},
                           tokenizer={"joint": False})
    model = Transformer(config_from_dict(separate["config"]).model, vocab, vocab + 7)
    assert count_parameters(model.state_dict(), False) == sum(p.numel() for p in model.parameters())


def test_best_validation_bleu_comes_from_the_run_log(state, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    records = [{"step": 50, "loss": 3.0}, {"step": 100, "valid_bleu": 12.5},
               {"step": 200, "valid_bleu": 14.25}, {"step": 300, "valid_bleu": 14.25}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 400, "valid_b',
                                   encoding="utf-8")
    text = card_text(state, run / "checkpoints" / "best.pt", "transformers")
    assert "validation BLEU of the training run: 14.25 at step 200" in text and "not a test score" in text
    (run / "log.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    assert "## Validation" not in card_text(state, run / "checkpoints" / "best.pt", "transformers")
    assert "## Validation" not in card_text(state, tmp_path / "elsewhere" / "m.pt", "transformers")


def test_the_card_is_deterministic_and_ends_with_one_newline(state, tmp_path):
    ev = Evaluation("newstest", 37.1, 62.0, {"bleu": "nrefs:1|tok:13a", "chrf": "nrefs:1|nc:6"}, 3003)
    texts = [card_text(state, tmp_path / "m.pt", "transformers", [ev], license="mit") for _ in range(2)]
    assert texts[0] == texts[1]
    assert texts[0].endswith("\n") and not texts[0].endswith("\n\n")


def test_several_test_sets_are_plain_yaml_one_result_each(state, tmp_path):
    evaluations = [Evaluation(name, bleu, None, {"bleu": f"sig-{name}"}, None)
                   for name, bleu in (("newstest2013", 25.5), ("newstest2014", 27.25))]
    text = card_text(state, tmp_path / "m.pt", "ctranslate2", evaluations)
    meta, _ = split_card(text)
    results = meta["model-index"][0]["results"]
    assert [(r["dataset"]["name"], r["metrics"][0]["value"]) for r in results] == [
        ("newstest2013", 25.5), ("newstest2014", 27.25)]
    assert "&id" not in text and "*id" not in text  # no YAML anchors for the repeated task


@pytest.mark.parametrize("content, names", [
    (None, "missing.json"),
    (b"{not json", "eval.json"),
    (b'{"chrf": 50.0, "signature": {"chrf": "x"}}', "eval.json"),  # no bleu
    (b'{"bleu": 30.0, "signature": {}}', "eval.json"),  # a score without its signature
    (b'[30.0]', "eval.json"),
])
def test_read_evaluation_errors_name_the_file(tmp_path, content, names):
    path = tmp_path / names
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError) as error:
        read_evaluation(f"test={path}")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_read_evaluation_needs_name_equals_file(tmp_path):
    for spec in ("eval.json", "=eval.json", "test="):
        with pytest.raises(UserError, match="NAME=FILE") as error:
            read_evaluation(spec)
        assert repr(spec) in str(error.value) and "\n" not in str(error.value)


def test_read_evaluation_reads_a_utf16_redirection(eval_file):
    # Windows PowerShell's `>` writes UTF-16 with a byte order mark
    utf16 = eval_file.with_name("eval16.json")
    utf16.write_bytes(eval_file.read_text(encoding="utf-8").encode("utf-16"))
    assert read_evaluation(f"t={utf16}") == read_evaluation(f"t={eval_file}")
