"""`mtkit prepare`: corpus -> cleaned pairs -> SentencePiece -> binary shards + manifest.

The output directory appears whole or not at all: everything is written to a temporary sibling
that is renamed into place at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from mtkit import __version__
from mtkit.config import RunConfig, config_to_dict
from mtkit.data.corpus import clean, length_filter, read_split
from mtkit.data.shards import MANIFEST, write_ids
from mtkit.data.vocab import Vocab, train_sentencepiece
from mtkit.errors import UserError

log = logging.getLogger("mtkit")


def _train_vocab(train_src: list[str], train_tgt: list[str], cfg: RunConfig) -> Vocab:
    tok = cfg.tokenizer
    if tok.joint:
        return Vocab(train_sentencepiece(train_src + train_tgt, tok))
    return Vocab(train_sentencepiece(train_src, tok),
                 train_sentencepiece(train_tgt, tok))


def prepare(cfg: RunConfig, force: bool = False) -> Path:
    """Run the whole preparation; returns the prepared directory."""
    out = Path(cfg.data.prepared_dir)
    if out.exists() and not force:
        raise UserError(f"{out}: already exists; pass --force to overwrite it")
    start = time.time()
    splits = {}
    for name in cfg.data.splits:
        split, dropped = clean(read_split(cfg.data, name))
        splits[name] = (split, dropped)
        log.info("read %s: %d pairs kept, %d dropped as empty", name, len(split.src), dropped["empty"])
    train = splits["train"][0]
    if not train.src:
        raise UserError(f"data.splits.train: no sentence pairs left after cleaning ({cfg.data.splits['train']})")
    log.info("training SentencePiece (%s, %d pieces, %s) on %d pairs", cfg.tokenizer.type,
             cfg.tokenizer.vocab_size, "joint" if cfg.tokenizer.joint else "separate", len(train.src))
    vocab = _train_vocab(train.src, train.tgt, cfg)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest_splits = {}
        for name, (split, dropped) in splits.items():
            src_ids, tgt_ids = vocab.encode_src(split.src), vocab.encode_tgt(split.tgt)
            if name == "train":  # only training pairs are filtered by length; evaluation sets stay whole
                keep, more = length_filter(src_ids, tgt_ids, cfg.data.max_tokens_per_sentence,
                                           cfg.data.max_length_ratio)
                dropped.update(more)
                src_ids, tgt_ids = [src_ids[i] for i in keep], [tgt_ids[i] for i in keep]
                split.src, split.tgt = [split.src[i] for i in keep], [split.tgt[i] for i in keep]
            write_ids(tmp, f"{name}.src", src_ids, vocab.src_size)
            write_ids(tmp, f"{name}.tgt", tgt_ids, vocab.tgt_size)
            for side, lines in (("src", split.src), ("tgt", split.tgt)):
                (tmp / f"{name}.{side}.txt").write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
            manifest_splits[name] = {
                "pairs": len(src_ids), "dropped": dropped, "sources": split.sources,
                "src_tokens": sum(map(len, src_ids)), "tgt_tokens": sum(map(len, tgt_ids)),
            }
            log.info("encoded %s: %d pairs, %d + %d tokens, dropped %s", name, len(src_ids),
                     manifest_splits[name]["src_tokens"], manifest_splits[name]["tgt_tokens"], dropped)
        (tmp / "spm.src.model").write_bytes(vocab.src_model)
        if not vocab.joint:
            (tmp / "spm.tgt.model").write_bytes(vocab.tgt_model)
        manifest = {
            "mtkit_version": __version__, "src_lang": cfg.data.src_lang, "tgt_lang": cfg.data.tgt_lang,
            "vocab": {"src_model": "spm.src.model", "tgt_model": None if vocab.joint else "spm.tgt.model",
                      "src_size": vocab.src_size, "tgt_size": vocab.tgt_size, "joint": vocab.joint},
            "splits": manifest_splits, "config": config_to_dict(cfg),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp makes it private; a prepared directory is ordinary output
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s in %.1f s", out, time.time() - start)
    return out
