"""Fine-tuning (--init-from), vocabularies brought from elsewhere (foreign special ids, from_model),
the vocabulary fingerprint, and several corpora with weights and tags in one run."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
import yaml

from conftest import synthetic_pairs, write_text_pair
from mtkit.card import card_text
from mtkit.checkpoint import load_checkpoint, step_checkpoints
from mtkit.config import config_from_dict
from mtkit.data.shards import PreparedData
from mtkit.data.vocab import BOS, EOS, PAD, UNK, Vocab
from mtkit.errors import UserError
from mtkit.prepare import prepare
from mtkit.train import learning_rate, train
from mtkit.translate import Translator
from test_reliability import mtkit, one_error, raw_config


def _config(work: Path, name: str, **changes) -> dict:
    raw = raw_config(work, run_dir=str(work / f"run_{name}"), max_steps=8, valid_every=8, log_every=4)
    raw["data"]["prepared_dir"] = str(work / f"prepared_{name}")
    raw["model"]["dropout"] = 0.0
    for key, value in changes.items():
        section, field = key.split(".")
        raw[section][field] = value
    return raw


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """xx->yy pairs (train, valid), and a second direction zz->yy made of the same words."""
    work = tmp_path_factory.mktemp("workflows")
    pairs = synthetic_pairs(400)
    write_text_pair(work, "train", pairs)
    write_text_pair(work, "valid", pairs[:6])
    for split, some in (("train", synthetic_pairs(150, seed=1)), ("valid", synthetic_pairs(5, seed=2))):
        (work / f"{split}.zz").write_text("".join(f"{s.replace(' ', ' , ')}\n" for s, _ in some))
        (work / f"{split}.yy2").write_text("".join(f"{t}\n" for _, t in some))
    return work


@pytest.fixture(scope="module")
def base(work) -> Path:
    """A trained xx->yy run (8 steps): the model fine-tuning starts from."""
    cfg = config_from_dict(_config(work, "base"))
    prepare(cfg)
    return train(cfg)


# Fine-tuning

def test_init_from_starts_at_step_one_with_the_old_weights_and_a_fresh_optimizer(work, base):
    raw = _config(work, "base", **{"train.run_dir": str(work / "tuned"), "train.max_steps": 1,
                                   "train.lr_factor": 1e-6, "train.init_from": str(base),
                                   "train.log_every": 1})
    train(config_from_dict(raw))
    old = load_checkpoint(step_checkpoints(base / "checkpoints")[-1])
    new = load_checkpoint(step_checkpoints(work / "tuned" / "checkpoints")[-1])
    assert new["step"] == 1 and old["step"] == 8
    assert new["train_state"]["optimizer"]["state"][0]["step"] == 1  # Adam's own count starts again
    for name, weight in old["model"].items():  # one tiny step away from the model it started from
        assert torch.allclose(new["model"][name], weight, atol=1e-5), name
    records = [json.loads(line) for line in (work / "tuned" / "log.jsonl").read_text().splitlines()]
    assert records[0]["init_from"]["step"] == 8 and records[0]["init_from"]["path"].endswith(".pt")
    first = next(r for r in records if "lr" in r)
    assert first["step"] == 1 and first["lr"] == pytest.approx(learning_rate(1, 32, 4, 1e-6))
    starts = json.loads((work / "tuned" / "starts.jsonl").read_text().splitlines()[0])
    assert starts["init_from"]["fingerprint"] == new["vocab_fingerprint"]


def test_linear_decay_trains_at_the_rate_of_its_schedule_down_to_zero(work):
    raw = _config(work, "linear", **{"train.lr_decay": "linear", "train.log_every": 1})
    cfg = config_from_dict(raw)
    prepare(cfg)
    run = train(cfg)
    rates = {r["step"]: r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
             if "lr" in r}
    assert sorted(rates) == list(range(1, 9))
    for step, lr in rates.items():
        assert lr == pytest.approx(learning_rate(step, 32, 4, 1.0, "linear", 8)), step
    assert rates[4] > rates[5] > rates[6] > rates[7] > rates[8] == 0.0
    last = step_checkpoints(run / "checkpoints")[-1]
    assert "linear decay to 0 at max_steps 8" in card_text(load_checkpoint(last), last, "transformers")


def test_init_from_with_other_dimensions_names_every_differing_key(work, base):
    raw = _config(work, "base", **{"train.run_dir": str(work / "other_dims"), "train.init_from": str(base),
                                   "model.d_ff": 48, "model.n_layers": 2})
    with pytest.raises(UserError, match=r"model\.d_ff \(64 there, 48 here\); model\.n_layers \(1 there, 2"):
        train(config_from_dict(raw))


def test_init_from_and_resume_refuse_another_vocabulary(work, base):
    raw = _config(work, "other_vocab", **{"tokenizer.seed": 3, "tokenizer.type": "unigram"})
    prepare(config_from_dict(raw))
    raw["train"]["init_from"] = str(base)
    (work / "other.yaml").write_text(yaml.safe_dump(raw))
    one_error(mtkit("train", "other.yaml", cwd=work), "init_from's vocabulary", "fingerprint",
              "tokenizer.from_model")
    one_error(mtkit("train", "other.yaml", "--init-from", str(base), "--resume", cwd=work), "--init-from")


def test_from_model_takes_a_runs_vocabulary_and_train_checks_it(work, base):
    raw = _config(work, "reuse", **{"tokenizer.from_model": str(base)})
    raw["data"]["splits"] = {"train": "train.{lang}", "valid": "valid.{lang}"}
    data = PreparedData(prepare(config_from_dict(raw)))
    expected = load_checkpoint(step_checkpoints(base / "checkpoints")[-1])["vocab_fingerprint"]
    assert data.fingerprint == expected == data.manifest["vocab"]["fingerprint"]
    # the same prepared directory with a config naming another vocabulary is refused
    other = copy.deepcopy(raw)
    other["tokenizer"]["from_model"] = None
    other["tokenizer"]["model"] = str(work / "foreign.model")
    _foreign_model(work / "foreign.model", work)
    with pytest.raises(UserError, match="prepared with the vocabulary .* run mtkit prepare again"):
        train(config_from_dict(other))


# Vocabularies made elsewhere

def _foreign_model(path: Path, work: Path) -> bytes:
    """A SentencePiece model as other toolkits make them: unk 0, eos 1, no pad, no bos."""
    if not path.exists():
        text = [line for name in ("train.xx", "train.yy") for line in (work / name).read_text().splitlines()]
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buffer, vocab_size=60,
                                       unk_id=0, eos_id=1, pad_id=-1, bos_id=-1, minloglevel=2,
                                       user_defined_symbols=["<BT>"])
        path.write_bytes(buffer.getvalue())
    return path.read_bytes()


def test_a_model_with_foreign_special_ids_prepares_trains_and_translates(work):
    model = _foreign_model(work / "foreign.model", work)
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = Vocab(model)
    assert vocab.src_size == sp.get_piece_size() + 2  # pad and bos added, everything else kept
    line = "the small dog runs"
    ids = vocab.encode_src([line])[0]
    assert min(ids) >= 4 and vocab.decode_tgt([ids]) == [line]
    specials = vocab.src_pieces_of([PAD, UNK, BOS, EOS])
    assert specials == ["<pad>", sp.id_to_piece(0), "<s>", sp.id_to_piece(1)]
    assert [vocab.src.id_to_piece(i) for i in ids] == sp.encode(line, out_type=str)

    raw = _config(work, "foreign", **{"tokenizer.model": str(work / "foreign.model")})
    cfg = config_from_dict(raw)
    data = PreparedData(prepare(cfg))
    src, _ = data.split("train")
    assert all(int(src[i].min()) >= 4 for i in range(len(src)))  # no sentence holds a special id
    assert data.vocab.fingerprint == vocab.fingerprint
    run = train(cfg)
    with Translator.load(run, device="cpu") as translator:
        out = translator.translate(["the dog", "", "a red house"])
    assert len(out) == 3 and out[1] == ""
    assert not any(s in line for line in out for s in ("<pad>", "<s>", "</s>"))


def test_a_missing_or_broken_model_file_is_one_line(work):
    (work / "broken.model").write_bytes(b"not a model")
    bad = _config(work, "bad", **{"tokenizer.model": "broken.model"})
    (work / "bad.yaml").write_text(yaml.safe_dump(bad))
    one_error(mtkit("prepare", "bad.yaml", cwd=work), "broken.model", "tokenizer.model")
    (work / "gone.yaml").write_text(yaml.safe_dump(_config(work, "bad", **{"tokenizer.model": "gone.model"})))
    one_error(mtkit("prepare", "gone.yaml", cwd=work), "gone.model", "not found")


# Several corpora

def _multi(work: Path, name: str) -> dict:
    raw = _config(work, name, **{"train.valid_bleu_sentences": 3})
    raw["data"]["corpora"] = [
        {"name": "xx-yy", "weight": 2},
        {"src_lang": "zz", "tgt_lang": "yy2", "weight": 0.5, "tag": "<2yy>"},
    ]
    return raw


def test_corpora_weights_and_tags_are_in_the_manifest_and_tags_stay_one_piece(work):
    data = PreparedData(prepare(config_from_dict(_multi(work, "multi"))))
    first, second = data.corpora("train")
    assert (first["name"], first["weight"], first["sampled_pairs"]) == ("xx-yy", 2.0, 2 * first["pairs"])
    assert (second["name"], second["tag"], second["start"]) == ("zz-yy2", "<2yy>", first["pairs"])
    assert second["sampled_pairs"] == round(0.5 * second["pairs"]) and second["pairs"] == 150
    tag = data.vocab.tag_id("<2yy>")
    assert data.vocab.src.id_to_piece(tag) == "<2yy>"
    assert data.vocab.encode_src(["<2yy>"])[0][-1] == tag  # a user-defined symbol: never split
    src, _ = data.split("train")
    assert all(src[i][0] == tag for i in range(second["start"], second["start"] + 150))
    assert not any(tag in src[i] for i in range(first["pairs"]))
    weighted, _ = data.training_pairs()
    assert len(weighted) == first["sampled_pairs"] + second["sampled_pairs"]
    index = weighted.index
    assert np.bincount(index[index < first["pairs"]]).tolist() == [2] * first["pairs"]
    assert [c["name"] for c in data.corpora("valid")] == ["xx-yy", "zz-yy2"]


def test_validation_reports_each_direction(work):
    cfg = config_from_dict(_multi(work, "multi_run"))
    prepare(cfg)
    run = train(cfg)
    valid = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()
             if "valid_loss" in line]
    directions = valid[-1]["directions"]
    assert set(directions) == {"xx-yy", "zz-yy2"}
    assert valid[-1]["valid_bleu"] == pytest.approx(np.mean([d["valid_bleu"] for d in directions.values()]))
    assert all(d["valid_loss"] > 0 for d in directions.values())


def test_two_corpora_of_one_direction_need_names(work):
    raw = _config(work, "dup")
    raw["data"]["corpora"] = [{}, {"weight": 2}]
    with pytest.raises(UserError, match=r"data.corpora\[1\]: another corpus is named 'xx-yy'"):
        config_from_dict(raw)


def test_one_model_per_side_keeps_two_vocabularies(work):
    def side_model(name: str, files: tuple[str, ...], size: int) -> Path:
        text = [line for f in files for line in (work / f).read_text().splitlines()]
        buffer = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buffer, vocab_size=size,
                                       minloglevel=2)  # SentencePiece's defaults: unk 0, bos 1, eos 2, no pad
        (work / name).write_bytes(buffer.getvalue())
        return work / name

    src, tgt = side_model("src.model", ("train.xx",), 30), side_model("tgt.model", ("train.yy",), 33)
    raw = _config(work, "sides", **{"tokenizer.src_model": str(src), "tokenizer.tgt_model": str(tgt),
                                    "tokenizer.joint": False, "model.share_embeddings": False})
    data = PreparedData(prepare(config_from_dict(raw)))
    assert not data.vocab.joint and (data.vocab.src_size, data.vocab.tgt_size) == (31, 34)
    _, tgt_ids = data.split("train")
    assert data.vocab.decode_tgt([tgt_ids[0].tolist()]) == [(work / "train.yy").read_text().splitlines()[0]]
    raw["tokenizer"]["joint"] = True
    with pytest.raises(UserError, match="set tokenizer.joint: false"):
        config_from_dict(raw)


def test_init_from_a_checkpoint_older_than_the_activation_keys(tmp_path):
    """A checkpoint whose config predates model.activation / model.output_bias has their defaults:
    it starts a relu run without a bias, and is refused for a swish one by name."""
    from conftest import untrained_checkpoint
    from mtkit.config import config_to_dict
    from mtkit.model import Transformer
    from mtkit.train import _init_weights

    ckpt = untrained_checkpoint(tmp_path)
    state = load_checkpoint(ckpt)
    for key in ("activation", "output_bias"):
        del state["config"]["model"][key]
    torch.save(state, ckpt)
    raw = config_to_dict(config_from_dict(state["config"]))
    raw["train"]["init_from"] = str(ckpt)
    cfg = config_from_dict(raw)
    data = PreparedData(cfg.data.prepared_dir)
    model = Transformer(cfg.model, data.vocab.src_size, data.vocab.tgt_size)
    _init_weights(model, cfg, data)
    key = "encoder.0.ffn.w1.weight"
    assert torch.equal(model.state_dict()[key], state["model"][key])
    raw["model"]["activation"] = "swish"
    with pytest.raises(UserError, match=r"model.activation \('relu' there, 'swish' here\)"):
        _init_weights(Transformer(config_from_dict(raw).model, data.vocab.src_size, data.vocab.tgt_size),
                      config_from_dict(raw), data)
