"""Hugging Face transformers, both ways: an mtkit model converted to transformers computes the same
function (in memory and after save_pretrained + from_pretrained), a random MarianMTModel (swish, an
output bias, Marian's vocab.json ids) imported into mtkit translates as transformers does, and
mtkit -> transformers -> mtkit gives the original model back."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import random_lines, synthetic_pairs, tiny_model_config, untrained_checkpoint, write_text_pair
from mtkit.checkpoint import load_checkpoint
from mtkit.config import DecodeConfig, config_from_dict
from mtkit.data.batching import pad
from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.errors import UserError
from mtkit.model import Transformer
from mtkit.search import greedy_search
from mtkit.translate import Translator

transformers = pytest.importorskip("transformers",
                                   reason='transformers is not installed (pip install "mtkit[hf]")')
from mtkit.hf import convert, export_hf, generate_ids, hf_translate, import_hf, layout, load_hf  # noqa: E402

VOCAB = 32


def random_batch(n: int, low: int, high: int, seed: int, eos: int | None = None, bos: int | None = None,
                 vocab: int = VOCAB) -> torch.Tensor:
    """n random id rows of lengths in [low, high], right-padded, without specials inside."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    rows = [torch.randint(4, vocab, (n_,), generator=g).tolist() for n_ in lengths]
    return pad(rows, prefix=bos, suffix=eos)


def roughen(model: torch.nn.Module) -> None:
    """Untrained LayerNorms are 1 and 0 and biases 0: make them count."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def pair(src_vocab: int = VOCAB, tgt_vocab: int = VOCAB, eos_bias: float = 0.0, **changes):
    """A tiny untrained mtkit model and its transformers twin; `eos_bias` > 0 (with an output bias)
    makes EOS likelier."""
    cfg = tiny_model_config(n_layers=2, **changes)
    model = Transformer(cfg, src_vocab, tgt_vocab).eval()
    roughen(model)
    if eos_bias:
        with torch.no_grad():
            model.output.bias[EOS] += eos_bias
    return model, convert(model.state_dict(), cfg, src_vocab, tgt_vocab)


CASES = {"post-norm, shared (Marian)": {"norm": "post"},
         "pre-norm, shared (Pegasus)": {"norm": "pre"},
         "post-norm, untied, two vocabularies (Marian)": {"norm": "post", "share_embeddings": False,
                                                          "tgt_vocab": 40},
         "post-norm, swish, output bias": {"norm": "post", "activation": "swish", "output_bias": True},
         "pre-norm, gelu, output bias": {"norm": "pre", "activation": "gelu", "output_bias": True}}


def test_layout_puts_sines_first():
    from mtkit.model import sinusoids

    table = sinusoids(10, 8)
    theirs = table[:, layout(8)]
    assert torch.equal(theirs[:, :4], table[:, 0::2]) and torch.equal(theirs[:, 4:], table[:, 1::2])


@pytest.mark.parametrize("case", CASES)
def test_teacher_forced_logits_match(case):
    changes = dict(CASES[case])
    tgt_vocab = changes.pop("tgt_vocab", VOCAB)
    model, hf = pair(tgt_vocab=tgt_vocab, **changes)
    assert type(hf).__name__ == ("PegasusForConditionalGeneration" if changes["norm"] == "pre"
                                 else "MarianMTModel")
    src = random_batch(5, 1, 12, seed=1, eos=EOS)
    tgt_in = random_batch(5, 1, 9, seed=2, bos=BOS, vocab=tgt_vocab)
    with torch.no_grad():
        ours = model(src, tgt_in)  # (B, T, V)
        theirs = hf(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt_in).logits
    real = tgt_in != PAD
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=0)


def test_pre_norm_with_two_embedding_matrices_is_one_error_line():
    cfg = tiny_model_config(norm="pre", share_embeddings=False)
    with pytest.raises(UserError, match="model.share_embeddings: false"):
        convert(Transformer(cfg, VOCAB, VOCAB).state_dict(), cfg, VOCAB, VOCAB)


@pytest.mark.parametrize(("norm", "eos_bias"), [("pre", 2.8), ("post", 0.5)])
def test_greedy_generate_equals_greedy_search(norm, eos_bias):
    model, hf = pair(norm=norm, output_bias=True, eos_bias=eos_bias)
    src = random_batch(8, 1, 10, seed=3, eos=EOS)
    offset = 8
    ours = greedy_search(model, src, max_len_offset=offset)
    steps = ((src != PAD).sum(1) + offset).tolist()  # per sentence: source + EOS + offset, the last EOS
    found = generate_ids(hf, src, max(steps), DecodeConfig(beam_size=1))
    assert [hyps[0].tokens[: n - 1] for hyps, n in zip(found, steps)] == ours
    assert any(len(row) < n - 1 for row, n in zip(ours, steps)), "no sentence ended by EOS: a weaker test"


# --- export, save, reload ------------------------------------------------------------------------

KINDS = {"post": {"norm": "post"}, "pre": {"norm": "pre"},
         "post, two vocabularies": {"norm": "post", "share_embeddings": False, "tokenizer": {"joint": False}}}


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, its transformers export) of an untrained model: post-norm (Marian), pre-norm
    (Pegasus), or post-norm with a SentencePiece model and embedding per side."""
    work = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    ckpt = untrained_checkpoint(work, max_positions=96, **KINDS[request.param])
    state = load_checkpoint(ckpt)
    weights = state["model"]
    g = torch.Generator().manual_seed(1)
    for name, w in weights.items():  # untrained norms and biases are 1 and 0: make them count
        if "norm" in name or name.endswith("bias"):
            w.add_(0.1 * torch.randn(w.shape, generator=g))
    torch.save(state, ckpt)
    return ckpt, export_hf(ckpt, work / "hf")


def test_reloaded_export_translates_as_mtkit_greedy(exported, one_thread):
    ckpt, out = exported
    lines = random_lines(24, seed=5) + ["", "  "]
    ours = Translator.load(ckpt, device="cpu", beam_size=1).translate(lines)
    theirs = hf_translate(load_hf(out), lines, beam_size=1)
    assert theirs == ours
    assert len(set(ours)) > 10 and theirs[-2:] == ["", ""]  # varied outputs, empty lines kept


def test_user_loads_the_export_with_auto_classes(exported, one_thread):
    """As a transformers user would: AutoTokenizer + AutoModelForSeq2SeqLM + generate with the
    directory's own generation config (beam size and all), one line at a time."""
    ckpt, out = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert model.generation_config.num_beams == 3  # the run's decode.beam_size
    assert model.generation_config.suppress_tokens == [PAD, BOS]
    lines = [line for line in random_lines(10, seed=6) if line]
    translator = Translator.load(ckpt, device="cpu", beam_size=1)
    for line in lines:
        ids = tokenizer(line, return_tensors="pt")
        assert ids.input_ids[0].tolist() == translator.vocab.encode_src([line])[0] + [EOS]
        steps = min(ids.input_ids.size(1) + 6, 95)  # decode.max_len_offset 6, within max_positions 96
        with torch.inference_mode():
            out_ids = model.generate(**ids, num_beams=1, max_length=steps + 1)
        text = tokenizer.decode(out_ids[0], skip_special_tokens=True)
        assert text == translator.translate([line])[0]


def test_teacher_forced_logits_after_reload(exported):
    ckpt, out = exported
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    ours = Translator.load(ckpt, device="cpu").model  # installed for CPU, same function
    model = Transformer(cfg.model, ours.src_embed.tokens.num_embeddings, ours.tgt_embed.tokens.num_embeddings)
    model.load_state_dict(state["model"])
    model.eval()
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    src = random_batch(4, 2, 20, seed=7, eos=EOS, vocab=200)
    tgt_in = random_batch(4, 2, 15, seed=8, bos=BOS, vocab=200)
    with torch.no_grad():
        a = model(src, tgt_in)
        b = theirs(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt_in).logits
    real = tgt_in != PAD
    torch.testing.assert_close(b[real], a[real], atol=1e-4, rtol=0)


def test_round_trip_gives_the_original_model(exported, tmp_path, one_thread):
    ckpt, out = exported
    back = import_hf(out, tmp_path / "back")
    original, returned = load_checkpoint(ckpt), load_checkpoint(back)
    assert returned["config"]["model"] == original["config"]["model"]
    assert returned["config"]["decode"] == original["config"]["decode"]
    assert returned["vocab"] == original["vocab"]  # the same SentencePiece model(s) and ids
    for name, w in original["model"].items():
        torch.testing.assert_close(returned["model"][name], w, atol=1e-6, rtol=0)
    lines = random_lines(20, seed=9)
    original_lines = Translator.load(ckpt, device="cpu").translate(lines)
    assert Translator.load(back, device="cpu").translate(lines) == original_lines


def test_export_refuses_a_non_empty_directory(exported, tmp_path):
    ckpt, _ = exported
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        export_hf(ckpt, tmp_path)
    export_hf(ckpt, tmp_path, force=True)
    assert (tmp_path / "mine.txt").read_text() == "keep" and (tmp_path / "model.safetensors").is_file()


# --- import of a MarianMTModel as OPUS-MT publishes them ----------------------------------------

def marian_spm(lines: list[str], size: int) -> bytes:
    """A SentencePiece model with Marian's ids (unk 0, <s> 1, </s> 2, no pad)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, vocab_size=size,
                                   model_type="unigram", minloglevel=2, num_threads=1,
                                   hard_vocab_limit=False)
    return buffer.getvalue()


def opus_mt_directory(path: Path, activation: str = "swish", **config) -> Path:
    """A random MarianMTModel saved as OPUS-MT models are: source.spm and target.spm of their own,
    one vocab.json (</s> 0, <unk> 1, pieces of both, <pad> last), swish, an output bias."""
    pairs = synthetic_pairs(400, seed=11)
    src_model, tgt_model = marian_spm([s for s, _ in pairs], 60), marian_spm([t for _, t in pairs], 70)
    pieces = []
    for model in (src_model, tgt_model):
        sp = spm.SentencePieceProcessor(model_proto=model)
        pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if not sp.is_control(i)
                   and not sp.is_unknown(i)]
    pieces = sorted(set(pieces))
    vocab = {"</s>": 0, "<unk>": 1, **{p: i + 2 for i, p in enumerate(pieces)}}
    vocab["<pad>"] = len(vocab)
    n = len(vocab)
    settings = dict(vocab_size=n, decoder_vocab_size=n, d_model=16, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                    decoder_ffn_dim=32,
                    activation_function=activation, max_position_embeddings=64, pad_token_id=n - 1,
                    eos_token_id=0, decoder_start_token_id=n - 1, forced_eos_token_id=0, scale_embedding=True,
                    share_encoder_decoder_embeddings=True, dropout=0.0, init_std=0.3)
    torch.manual_seed(2)
    model = transformers.MarianMTModel(transformers.MarianConfig(**{**settings, **config})).eval()
    roughen(model)
    with torch.no_grad():
        model.final_logits_bias.normal_(0, 0.5)
    path.mkdir(parents=True)
    model.save_pretrained(path)
    (path / "source.spm").write_bytes(src_model)
    (path / "target.spm").write_bytes(tgt_model)
    (path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    tokenizer = transformers.MarianTokenizer(str(path / "source.spm"), str(path / "target.spm"),
                                             str(path / "vocab.json"), source_lang="xx", target_lang="yy")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def opus_mt(tmp_path_factory) -> Path:
    return opus_mt_directory(tmp_path_factory.mktemp("opus") / "model")


def test_imported_marian_translates_as_transformers(opus_mt, tmp_path, one_thread):
    ckpt = import_hf(opus_mt, tmp_path / "mt")
    cfg = config_from_dict(load_checkpoint(ckpt)["config"])
    assert (cfg.model.activation, cfg.model.output_bias, cfg.model.norm) == ("swish", True, "post")
    tokenizer = transformers.AutoTokenizer.from_pretrained(opus_mt)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(opus_mt).eval()
    offset = 12
    translator = Translator.load(ckpt, device="cpu", beam_size=1, max_len_offset=offset)
    lines = [s for s, _ in synthetic_pairs(20, seed=12)]
    ours = translator.translate(lines)
    theirs = []
    for line in lines:
        ids = tokenizer(line, return_tensors="pt")
        steps = min(ids.input_ids.size(1) + offset, 63)  # mtkit's limit: source + EOS + offset steps
        with torch.inference_mode():
            out = model.generate(**ids, num_beams=1, do_sample=False, max_length=steps + 1,
                                 suppress_tokens=[model.config.pad_token_id])
        theirs.append(tokenizer.decode(out[0], skip_special_tokens=True))
    assert ours == theirs
    assert len(set(ours)) > 10 and all(ours), "outputs empty or alike: a weaker test"


def test_imported_marian_logits_match(opus_mt, tmp_path):
    ckpt = import_hf(opus_mt, tmp_path / "mt")
    state = load_checkpoint(ckpt)
    cfg = config_from_dict(state["config"])
    ids = json.loads((opus_mt / "vocab.json").read_text())
    pieces = state["vocab"]["pieces"]
    n = len(ids)
    rows = [n - 1 if i in (PAD, BOS) else ids[p] for i, p in enumerate(pieces)]  # mtkit id -> Marian id
    ours = Transformer(cfg.model, len(pieces), len(pieces)).eval()
    ours.load_state_dict(state["model"])
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(opus_mt).eval()
    src = random_batch(4, 2, 12, seed=13, eos=EOS, vocab=len(pieces))
    tgt_in = random_batch(4, 2, 10, seed=14, bos=BOS, vocab=len(pieces))
    as_marian = torch.tensor(rows)
    with torch.no_grad():
        a = ours(src, tgt_in)
        b = theirs(input_ids=as_marian[src], attention_mask=src != PAD,
                   decoder_input_ids=as_marian[tgt_in]).logits[..., as_marian]
    real = tgt_in != PAD
    torch.testing.assert_close(a[real], b[real], atol=1e-4, rtol=0)


def test_imported_marian_fine_tunes(opus_mt, tmp_path):
    """train --init-from OUT with tokenizer.from_model: OUT: prepare encodes with the model's id
    map, and training starts from its weights (the first loss is the imported model's)."""
    from mtkit.prepare import prepare
    from mtkit.train import train

    mt = tmp_path / "mt"
    import_hf(opus_mt, mt)
    write_text_pair(tmp_path, "train", synthetic_pairs(120, seed=15))
    raw = {"data": {"dir": str(tmp_path), "splits": {"train": "train.{lang}", "valid": "train.{lang}"},
                    "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(tmp_path / "prepared")},
           "tokenizer": {"from_model": str(mt), "joint": False},
           "model": {"d_model": 16, "n_heads": 2, "d_ff": 32, "n_layers": 2, "dropout": 0.0,
                     "max_positions": 64, "activation": "swish", "output_bias": True},
           "train": {"max_tokens": 400, "max_steps": 6, "warmup_steps": 2, "log_every": 1, "valid_every": 6,
                     "valid_bleu_sentences": 4, "precision": "fp32", "device": "cpu", "threads": 1,
                     "compile": False, "run_dir": str(tmp_path / "run"), "init_from": str(mt)},
           "decode": {"beam_size": 1}}
    cfg = config_from_dict(raw)
    data_dir = prepare(cfg)
    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    assert manifest["vocab"]["pieces"] == "pieces.json"
    threads = torch.get_num_threads()
    run = train(cfg)
    torch.set_num_threads(threads)
    log = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    assert log[0]["init_from"]["path"].endswith("model.pt")
    assert np.isfinite([r["loss"] for r in log if "loss" in r]).all()


def test_import_errors_are_one_line(opus_mt, tmp_path):
    import shutil

    out = tmp_path / "out"
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path, out)
    with pytest.raises(UserError, match="activation_function 'gelu_new'"):
        import_hf(opus_mt_directory(tmp_path / "gelu_new", activation="gelu_new"), out)
    with pytest.raises(UserError, match="encoder_layers 2 != decoder_layers 1"):
        import_hf(opus_mt_directory(tmp_path / "uneven", decoder_layers=1), out)
    copy = tmp_path / "copy"
    shutil.copytree(opus_mt, copy)
    (copy / "vocab.json").unlink()
    with pytest.raises(UserError, match="no vocab.json"):
        import_hf(copy, out)
    assert not out.exists()  # nothing half-written


def test_every_translator_puts_the_prefix_tag_first(tmp_path, one_thread):
    """decode.prefix goes through the shared line pipeline: transformers (and CTranslate2, when
    installed) translate tagged sources as mtkit does."""
    from conftest import tagged_vocab
    from mtkit.checkpoint import save_checkpoint
    from mtkit.config import RunConfig, config_to_dict
    from mtkit.hf import to_transformers

    vocab = tagged_vocab()
    cfg = RunConfig(model=tiny_model_config(n_layers=2, max_positions=64))
    cfg.decode = DecodeConfig(beam_size=1, max_len_offset=8, prefix="<BT>")
    cfg.data.splits = {"train": "train.{lang}", "valid": "valid.{lang}"}
    model = Transformer(cfg.model, vocab.src_size, vocab.tgt_size)
    roughen(model)
    ckpt = tmp_path / "tagged.pt"
    save_checkpoint({"model": model.state_dict(), "config": config_to_dict(cfg), "vocab": vocab.to_state(),
                     "step": 0}, ckpt)
    lines = random_lines(16, seed=8)
    translator = Translator.load(ckpt, device="cpu")
    ours = translator.translate(lines)
    tag = vocab.tag_id("<BT>")
    assert all(t.src_ids[0] == tag for t, line in zip(translator.run(lines), lines) if line.strip())
    assert hf_translate(to_transformers(ckpt), lines) == ours
    if importlib.util.find_spec("ctranslate2") is not None:
        from mtkit.export import ct2_translate, export_ctranslate2

        assert ct2_translate(export_ctranslate2(ckpt, tmp_path / "ct2"), lines) == ours


def test_tokenizer_vocab_gives_the_imported_ids(opus_mt, tmp_path):
    """tokenizer.src_model + tgt_model + vocab (Marian's files, no import) prepare data with the
    same ids, fingerprint and all, as the imported model's vocabulary; a bad vocab.json is one line."""
    from mtkit.data.shards import PreparedData
    from mtkit.data.vocab import Vocab
    from mtkit.prepare import prepare

    imported = Vocab.from_state(load_checkpoint(import_hf(opus_mt, tmp_path / "mt"))["vocab"])
    write_text_pair(tmp_path, "train", synthetic_pairs(50, seed=16))
    raw = {"data": {"dir": str(tmp_path), "splits": {"train": "train.{lang}", "valid": "train.{lang}"},
                    "src_lang": "xx", "tgt_lang": "yy", "prepared_dir": str(tmp_path / "prepared")},
           "tokenizer": {"src_model": str(opus_mt / "source.spm"), "tgt_model": str(opus_mt / "target.spm"),
                         "vocab": str(opus_mt / "vocab.json"), "joint": False},
           "model": {"share_embeddings": True}}
    data = PreparedData(prepare(config_from_dict(raw)))
    assert data.fingerprint == imported.fingerprint and data.vocab.shared_ids
    src, _ = data.split("train")
    assert src[0].tolist() == imported.encode_src([synthetic_pairs(50, seed=16)[0][0]])[0]
    broken = tmp_path / "broken.json"
    ids = json.loads((opus_mt / "vocab.json").read_text())
    del ids["</s>"]
    broken.write_text(json.dumps(ids))
    raw["tokenizer"]["vocab"] = str(broken)
    raw["data"]["prepared_dir"] = str(tmp_path / "prepared2")
    with pytest.raises(UserError, match=r"broken.json \(tokenizer.vocab\): no '</s>' piece"):
        prepare(config_from_dict(raw))
