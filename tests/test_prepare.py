"""`prepare`: reading every supported format, cleaning counts, shards, and refusing bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import synthetic_pairs, write_text_pair
from mtkit.config import config_from_dict
from mtkit.data.corpus import decode_lines, read_lines
from mtkit.data.shards import PreparedData
from mtkit.errors import UserError
from mtkit.prepare import prepare


def cfg_for(tmp_path, splits, fmt="text", **data):
    raw = {"data": {"format": fmt, "dir": str(tmp_path), "splits": splits, "src_lang": "xx", "tgt_lang": "yy",
                    "prepared_dir": str(tmp_path / "prepared"), **data},
           "tokenizer": {"vocab_size": 60, "byte_fallback": False}}
    return config_from_dict(raw)


def test_text_pairs_are_cleaned_encoded_and_counted(tmp_path):
    pairs = synthetic_pairs(200)
    noisy = pairs + [("  spaced \t out  ", " fine "), ("", "only target"), ("x " * 400, "short")]
    write_text_pair(tmp_path, "train", noisy, gz=True)
    write_text_pair(tmp_path, "valid", pairs[:20])
    out = prepare(cfg_for(tmp_path, {"train": "train.{lang}.gz", "valid": "valid.{lang}"}))
    manifest = json.loads((out / "manifest.json").read_text())
    train = manifest["splits"]["train"]
    assert train["dropped"] == {"empty": 1, "too_long": 1, "length_ratio": 0}
    assert train["pairs"] == 201
    assert all("sha256:" in s for s in train["sources"])
    data = PreparedData(out)
    src, tgt = data.split("train")
    assert len(src) == len(tgt) == 201
    assert data.vocab.src.decode(src[200].tolist()) == "spaced out"
    assert data.vocab.decode_tgt([tgt[200].tolist()]) == ["fine"]
    assert data.vocab.decode_tgt([tgt[0].tolist()]) == [pairs[0][1]]
    assert src[0].dtype == np.uint16
    assert not (out / "train.src.txt").exists()  # only evaluation splits keep their text
    assert data.text("valid", "src") == [s for s, _ in pairs[:20]]


def test_tsv_and_jsonl_read_the_same_pairs(tmp_path):
    pairs = synthetic_pairs(120)
    (tmp_path / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in pairs))
    with open(tmp_path / "train.jsonl", "w") as f:
        for s, t in pairs:
            f.write(json.dumps({"translation": {"xx": s, "yy": t}}) + "\n")
    (tmp_path / "tsv").mkdir()
    out_tsv = prepare(cfg_for(tmp_path, {"train": "train.tsv", "valid": "train.tsv"}, "tsv",
                              prepared_dir=str(tmp_path / "p_tsv")))
    out_jsonl = prepare(cfg_for(tmp_path, {"train": "train.jsonl", "valid": "train.jsonl"}, "jsonl",
                                prepared_dir=str(tmp_path / "p_jsonl"), src_field="translation.xx",
                                tgt_field="translation.yy"))
    assert PreparedData(out_tsv).text("valid", "src") == [s for s, _ in pairs]
    assert PreparedData(out_jsonl).text("valid", "tgt") == [t for _, t in pairs]


def test_mismatched_line_counts_name_both_counts_and_write_nothing(tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(50))
    (tmp_path / "train.yy").write_text("one\ntwo\n")
    cfg = cfg_for(tmp_path, {"train": "train.{lang}", "valid": "train.{lang}"})
    with pytest.raises(UserError, match=r"train.xx has 50 lines but .*train.yy has 2"):
        prepare(cfg)
    assert not (tmp_path / "prepared").exists()


def test_existing_output_needs_force(tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(100))
    cfg = cfg_for(tmp_path, {"train": "train.{lang}", "valid": "train.{lang}"})
    out = prepare(cfg)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    with pytest.raises(UserError, match="--force"):
        prepare(cfg)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    prepare(cfg, force=True)
    assert PreparedData(out).manifest["splits"]["train"]["pairs"] == 100


def test_separate_vocabularies(tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(150))
    cfg = cfg_for(tmp_path, {"train": "train.{lang}", "valid": "train.{lang}"})
    cfg.tokenizer.joint, cfg.model.share_embeddings = False, False
    data = PreparedData(prepare(cfg))
    assert not data.vocab.joint
    assert "▁DOG" in {data.vocab.tgt.id_to_piece(i) for i in range(data.vocab.tgt_size)}
    assert "▁DOG" not in {data.vocab.src.id_to_piece(i) for i in range(data.vocab.src_size)}


def test_lines_split_on_newline_only(tmp_path):
    path = tmp_path / "odd.txt"
    path.write_bytes("a\rb\nc\u2028d\n\x0ce\r\n\n".encode())
    assert read_lines(path) == ["a\rb", "c\u2028d", "\x0ce", ""]


def test_invalid_utf8_names_the_line():
    with pytest.raises(UserError, match="in.txt: line 2: invalid UTF-8"):
        decode_lines(b"ok\nbad \xff\n", "in.txt")


def test_missing_file_is_named(tmp_path):
    cfg = cfg_for(tmp_path, {"train": "nothere.{lang}", "valid": "nothere.{lang}"})
    with pytest.raises(UserError, match="nothere.xx: file not found"):
        prepare(cfg)
