"""Corpora larger than memory: streamed prepare (chunks, worker processes, bounded SentencePiece
sample, shards, dedup) and pooled batching, checked against the in-memory computation."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mtkit.prepare
from conftest import synthetic_pairs, write_text_pair
from mtkit.config import config_from_dict
from mtkit.data.batching import pooled_batches, rank_batches, step_groups, token_batches
from mtkit.data.corpus import Chunk, normalize, read_lines
from mtkit.data.shards import PreparedData, ShardWriter, TokenArray
from mtkit.data.vocab import sample_pairs
from mtkit.errors import UserError
from mtkit.prepare import prepare


def cfg_for(tmp_path, name="prepared", **data):
    raw = {"data": {"dir": str(tmp_path), "splits": {"train": "train.{lang}.gz", "valid": "valid.{lang}"},
                    "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(tmp_path / name), **data},
           "tokenizer": {"vocab_size": 60, "byte_fallback": False}}
    return config_from_dict(raw)


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(mtkit.prepare, "CHUNK_PAIRS", 37)  # many chunks from a small corpus


def test_streamed_prepare_with_workers_and_shards_equals_the_in_memory_result(tmp_path, small_chunks):
    pairs = synthetic_pairs(400) + [(" a  dog ", "A DOG"), ("", "empty source"), ("dog " * 40, "DOG")]
    write_text_pair(tmp_path, "train", pairs, gz=True)
    write_text_pair(tmp_path, "valid", pairs[:30])
    data = PreparedData(prepare(cfg_for(tmp_path, num_proc=2, shard_size=50)))
    train = data.manifest["splits"]["train"]
    assert len(train["src"]["shards"]) == 9
    # the same computation in memory: read, clean, encode, filter
    src = [normalize(s) for s in read_lines(tmp_path / "train.xx.gz")]
    tgt = [normalize(t) for t in read_lines(tmp_path / "train.yy.gz")]
    kept = [(s, t) for s, t in zip(src, tgt) if s and t]
    ids = [(a, b) for a, b in zip(data.vocab.encode_src([s for s, _ in kept]),
                                  data.vocab.encode_tgt([t for _, t in kept]))
           if max(len(a), len(b)) <= 3 * max(1, min(len(a), len(b)))]
    arrays = data.split("train")
    assert len(arrays[0]) == train["pairs"] == len(ids)
    assert train["dropped"] == {"empty": 1, "too_long": 0, "length_ratio": len(kept) - len(ids)}
    assert train["dropped"]["length_ratio"] >= 1  # the dog x 40 pair
    for side, array in enumerate(arrays):
        assert [array[i].tolist() for i in range(len(array))] == [pair[side] for pair in ids]
        assert array.lengths.tolist() == [len(pair[side]) for pair in ids]
    assert data.text("valid", "tgt") == [t for _, t in pairs[:30]]


def test_the_same_corpus_in_process_and_in_workers_gives_the_same_files(tmp_path, small_chunks):
    write_text_pair(tmp_path, "train", synthetic_pairs(300), gz=True)
    write_text_pair(tmp_path, "valid", synthetic_pairs(10, seed=1))
    one = prepare(cfg_for(tmp_path, "one", num_proc=1, shard_size=64))
    two = prepare(cfg_for(tmp_path, "two", num_proc=2, shard_size=64))
    names = sorted(p.name for p in one.iterdir() if p.name != "manifest.json")
    assert names == sorted(p.name for p in two.iterdir() if p.name != "manifest.json")
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_sentencepiece_trains_on_a_bounded_seeded_sample(tmp_path):
    chunks = [Chunk("records", ("a", "a"), [(f"s{i}", f"t{i}") for i in range(start, start + 100)], start + 1)
              for start in range(0, 1000, 100)]
    sample, seen = sample_pairs(chunks, 50, seed=3)
    assert seen == 1000 and len(sample.items) == 50 == len(set(sample.items))
    assert (sample.items == sample_pairs(chunks, 50, seed=3)[0].items
            != sample_pairs(chunks, 50, seed=4)[0].items)
    assert all(sample.items[i][0] == f"s{sample.number(i) - 1}" for i in range(50))  # line numbers follow
    # asking for more than there are gives all, in order
    assert sample_pairs(chunks, 5000, seed=3)[0].items == [p for c in chunks for p in c.items]
    write_text_pair(tmp_path, "train", synthetic_pairs(3000), gz=True)
    write_text_pair(tmp_path, "valid", synthetic_pairs(10))
    cfg = cfg_for(tmp_path, "a")
    cfg.tokenizer.input_sentence_size = 200
    a = PreparedData(prepare(cfg))
    cfg.data.prepared_dir = str(tmp_path / "b")
    b = PreparedData(prepare(cfg))
    assert a.manifest["splits"]["train"]["pairs"] == 3000
    assert (a.dir / "spm.src.model").read_bytes() == (b.dir / "spm.src.model").read_bytes()


def test_dedup_drops_exact_duplicate_pairs_and_counts_them(tmp_path, small_chunks):
    pairs = synthetic_pairs(120)
    # repeats across chunks and within one, and a repeat that differs only in whitespace
    corpus = (pairs + pairs[:50] + [pairs[3], pairs[3]] + [(f" {pairs[7][0]} ", pairs[7][1])]
              + [(pairs[8][0], "OTHER")])
    write_text_pair(tmp_path, "train", corpus, gz=True)
    write_text_pair(tmp_path, "valid", pairs[:5] * 2)
    out = prepare(cfg_for(tmp_path, dedup=True, max_length_ratio=None))
    # first occurrences, in order
    unique = list(dict.fromkeys((normalize(s), normalize(t)) for s, t in corpus))
    assert len(corpus) - len(unique) >= 53
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["dropped"]["duplicate"] == len(corpus) - len(unique)
    assert manifest["splits"]["train"]["pairs"] == len(unique)
    assert manifest["splits"]["valid"]["pairs"] == 10  # evaluation splits stay whole
    assert not [p.name for p in out.iterdir() if "sqlite" in p.name]
    data = PreparedData(out)
    src, tgt = data.split("train")
    decoded = [(data.vocab.src.decode(src[i].tolist()), data.vocab.tgt.decode(tgt[i].tolist()))
               for i in range(len(src))]
    assert decoded == unique and decoded[-1] == (pairs[8][0], "OTHER")


def test_token_array_over_shards_equals_the_concatenation(tmp_path):
    rng = np.random.default_rng(0)
    sentences = [rng.integers(0, 300, size=int(rng.integers(0, 9))) for _ in range(101)]
    writer = ShardWriter(tmp_path, "x", 17, (np.dtype(np.uint16), np.dtype(np.int32)))
    for start in range(0, 101, 30):  # appends that cross shard boundaries
        part = sentences[start : start + 30]
        lens = np.array([len(s) for s in part], dtype=np.int32)
        writer.append(np.concatenate(part), lens, np.concatenate(part), lens)
    entry = writer.close()
    assert entry["pairs"] == 101 and len(entry["src"]["shards"]) == 6
    array = TokenArray(tmp_path, entry["src"], entry["pairs"], entry["shard_size"])
    assert len(array) == 101 and array.longest == max(map(len, sentences))
    for i in rng.permutation(101):
        assert array[i].tolist() == sentences[i].tolist() and array[i].dtype == np.uint16


def test_pooled_batches_equal_global_batches_when_one_pool_holds_the_corpus():
    rng = np.random.default_rng(0)
    src, tgt = rng.integers(1, 60, 3000), rng.integers(1, 60, 3000)
    expected = token_batches(src, tgt, 500, np.random.default_rng([4, 2]))
    for pool in (None, 3000, 10**6):
        got = list(pooled_batches(src, tgt, 500, np.random.default_rng([4, 2]), pool))
        assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_small_pools_cover_every_sentence_once_within_the_budget():
    rng = np.random.default_rng(1)
    src, tgt = rng.integers(1, 60, 5000), rng.integers(1, 60, 5000)
    for epoch in range(2):
        batches = list(pooled_batches(src, tgt, 400, np.random.default_rng([4, epoch]), 1500))
        seen = np.concatenate(batches)
        assert np.array_equal(np.sort(seen), np.arange(5000))
        for b in batches:
            assert len(b) == 1 or len(b) * (max(src[b].max(), tgt[b].max()) + 1) <= 400
        assert not np.array_equal(seen[:1024], np.arange(1024))  # pools draw blocks in random order


def test_ranks_share_out_each_step_and_resume_skips_whole_steps():
    rng = np.random.default_rng(2)
    src, tgt = rng.integers(1, 30, 4000), rng.integers(1, 30, 4000)
    groups = list(step_groups(src, tgt, 300, 7, 0, 3, 1500))
    assert all(len(g) == 3 for g in groups)
    per_rank = [list(rank_batches(step_groups(src, tgt, 300, 7, 0, 3, 1500), r, 3)) for r in range(3)]
    assert all(np.array_equal(per_rank[r][k], groups[k][r]) for r in range(3) for k in range(len(groups)))
    later = list(step_groups(src, tgt, 300, 7, 0, 3, 1500, skip=4))
    assert (len(later) == len(groups) - 4
            and all(np.array_equal(a[0], b[0]) for a, b in zip(later, groups[4:])))


def test_an_error_in_a_worker_is_one_line_naming_the_file_and_line_and_nothing_is_written(tmp_path,
                                                                                          small_chunks):
    pairs = synthetic_pairs(200)
    write_text_pair(tmp_path, "train", pairs, gz=True)
    write_text_pair(tmp_path, "valid", pairs[:100])
    lines = (tmp_path / "valid.yy").read_bytes().split(b"\n")
    lines[76] = b"bad \xff byte"
    (tmp_path / "valid.yy").write_bytes(b"\n".join(lines))
    with pytest.raises(UserError) as err:
        prepare(cfg_for(tmp_path, num_proc=2))
    assert str(err.value) == f"{tmp_path / 'valid.yy'}: line 77: invalid UTF-8 (invalid start byte)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.xx.gz", "train.yy.gz", "valid.xx",
                                                          "valid.yy"]


def test_a_prepared_directory_of_the_old_layout_is_refused_by_name(tmp_path):
    write_text_pair(tmp_path, "train", synthetic_pairs(50), gz=True)
    write_text_pair(tmp_path, "valid", synthetic_pairs(5))
    out = prepare(cfg_for(tmp_path))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["format"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"prepared in layout 1 .* run `mtkit prepare --force` again"):
        PreparedData(out)
