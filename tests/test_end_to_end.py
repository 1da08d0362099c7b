"""The whole pipeline through the CLI on a slice of Multi30k: prepare -> train -> translate -> evaluate,
plus resume, averaging, one-line-per-line output and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, write_slice
from mtkit.checkpoint import load_checkpoint, step_checkpoints

N_TRAIN = 300


def mtkit(*args: str, cwd: Path, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "mtkit", *args], cwd=cwd, input=stdin, text=True,
                          capture_output=True, env=env, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtkit {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def tiny_run_config(data_dir: Path, max_steps: int) -> dict:
    """A small model that can memorise 300 pairs in a few hundred CPU steps."""
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart_cpu.yaml").read_text())
    cfg["data"].update(dir=str(data_dir), splits={"train": "train.{lang}", "valid": "val.{lang}"},
                       prepared_dir="prepared")
    cfg["tokenizer"]["vocab_size"] = 800
    cfg["model"].update(d_model=64, n_heads=2, d_ff=128, n_layers=2, dropout=0.0)
    cfg["train"].update(run_dir="run", max_tokens=1200, max_steps=max_steps, warmup_steps=60, lr_factor=0.5,
                        valid_every=150, valid_bleu_sentences=50, log_every=25, keep_last=3,
                        precision="fp32", threads=None)
    cfg["decode"].update(beam_size=2, max_len_offset=20)
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory, multi30k):
    """Prepare and train once for the whole module; returns the work directory."""
    data = multi30k
    work = tmp_path_factory.mktemp("e2e")
    write_slice(data, work / "data", "train", N_TRAIN)
    # validate on the training slice: memorisation is the aim
    write_slice(data, work / "data", "val", N_TRAIN)
    (work / "data" / "val.de").write_text((work / "data" / "train.de").read_text())
    (work / "data" / "val.en").write_text((work / "data" / "train.en").read_text())
    (work / "run.yaml").write_text(yaml.safe_dump(tiny_run_config(work / "data", 300)))
    (work / "untrained.yaml").write_text(yaml.safe_dump(
        {**tiny_run_config(work / "data", 1), "train": {**tiny_run_config(work / "data", 1)["train"],
                                                        "run_dir": "untrained", "lr_factor": 1e-9}}))
    mtkit("prepare", "run.yaml", cwd=work)
    mtkit("train", "run.yaml", cwd=work)
    mtkit("train", "untrained.yaml", cwd=work)
    return work


def test_loss_falls_and_the_model_reproduces_training_sentences(trained):
    log = [json.loads(line) for line in (trained / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert (trained / "run" / "curves.png").stat().st_size > 1000
    assert (trained / "run" / "config.yaml").is_file()
    bleu = {}
    for run in ("run", "untrained"):
        out = mtkit("evaluate", "-m", run, "--src", "data/train.de", "--ref", "data/train.en", "--json",
                    cwd=trained)
        bleu[run] = json.loads(out.stdout)["bleu"]
    assert bleu["run"] > bleu["untrained"] + 40, bleu


def test_checkpoints_are_self_contained_and_pruned(trained):
    steps = step_checkpoints(trained / "run" / "checkpoints")
    assert [p.name for p in steps] == ["step_00000150.pt", "step_00000300.pt"]
    ckpt = load_checkpoint(steps[-1])
    assert ckpt["step"] == 300 and "train_state" in ckpt and ckpt["config"]["model"]["d_model"] == 64
    assert isinstance(ckpt["vocab"]["src"], bytes)
    assert "train_state" not in load_checkpoint(trained / "run" / "checkpoints" / "best.pt")


def test_translate_keeps_one_line_per_line_in_order(trained):
    lines = (trained / "data" / "train.de").read_text().splitlines()[:6]
    text = "\n".join([lines[0], "", lines[1], "   ", lines[2], "\t"] + lines[3:]) + "\n"
    out = mtkit("translate", "-m", "run", cwd=trained, stdin=text)
    hyps = out.stdout.split("\n")
    assert hyps[-1] == "" and len(hyps) - 1 == text.count("\n")
    assert hyps[1] == "" and hyps[3] == "" and hyps[5] == ""
    assert all(hyps[i] for i in (0, 2, 4, 6, 7, 8))
    alone = [mtkit("translate", "-m", "run", cwd=trained, stdin=line + "\n").stdout for line in lines[:3]]
    assert [hyps[0], hyps[2], hyps[4]] == [a.rstrip("\n") for a in alone]
    assert "mtkit:" not in out.stdout  # logs stay on stderr


def test_python_api_matches_the_cli(trained):
    from mtkit import Translator

    lines = (trained / "data" / "train.de").read_text().splitlines()[:5]
    api = Translator.load(trained / "run").translate(lines)
    cli = mtkit("translate", "-m", "run", "--input", "data/train.de", cwd=trained).stdout.splitlines()[:5]
    assert api == cli


def test_nbest_and_greedy(trained):
    src = "\n".join((trained / "data" / "train.de").read_text().splitlines()[:3]) + "\n"
    out = mtkit("translate", "-m", "run", "--nbest", "2", cwd=trained, stdin=src).stdout.splitlines()
    assert [line.split(" ||| ")[0] for line in out] == ["0", "0", "1", "1", "2", "2"]
    greedy = mtkit("translate", "-m", "run", "--greedy", cwd=trained, stdin=src).stdout.splitlines()
    beam1 = mtkit("translate", "-m", "run", "--beam", "1", cwd=trained, stdin=src).stdout.splitlines()
    assert greedy == beam1 and len(greedy) == 3
    err = mtkit("translate", "-m", "run", "--nbest", "5", cwd=trained, stdin=src, check=False)
    assert err.returncode == 2 and "beam size" in err.stderr


def test_resume_continues_the_run(trained):
    cfg = yaml.safe_load((trained / "run.yaml").read_text())
    cfg["train"]["max_steps"] = 450
    (trained / "more.yaml").write_text(yaml.safe_dump(cfg))
    refused = mtkit("train", "more.yaml", cwd=trained, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    changed = mtkit("train", "more.yaml", "--resume", "--set", "model.d_ff=256", cwd=trained, check=False)
    assert changed.returncode == 2 and "model.d_ff" in changed.stderr
    mtkit("train", "more.yaml", "--resume", cwd=trained)
    log = [json.loads(line) for line in (trained / "run" / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in log if "loss" in r]
    assert train_steps == list(range(25, 451, 25))  # no step lost or logged twice
    assert load_checkpoint(step_checkpoints(trained / "run" / "checkpoints")[-1])["step"] == 450


def test_average_writes_a_model_translate_prefers(trained):
    mtkit("average", "run", "--last", "2", cwd=trained)
    avg = load_checkpoint(trained / "run" / "checkpoints" / "averaged.pt")
    a, b = (load_checkpoint(p) for p in step_checkpoints(trained / "run" / "checkpoints")[-2:])
    key = "encoder.0.ffn.w1.weight"
    assert avg["model"][key].allclose((a["model"][key] + b["model"][key]) / 2)
    out = mtkit("translate", "-m", "run", cwd=trained, stdin="Ein Hund.\n")
    assert "averaged.pt" in out.stderr and len(out.stdout.splitlines()) == 1


def test_hf_export_round_trip_on_test_lines(trained, multi30k):
    """export --format hf with the run's evaluation -> transformers reloads it from disk and gives
    mtkit's greedy lines and logits on test_2016_flickr; import gives the original translations."""
    import gzip
    import importlib.util

    transformers = pytest.importorskip("transformers", reason='pip install "mtkit[hf]"')
    import torch

    from mtkit.data.batching import pad
    from mtkit.data.vocab import BOS, EOS, PAD
    from mtkit.hf import hf_translate, load_hf
    from mtkit.translate import load_model

    for lang in ("de", "en"):
        with gzip.open(multi30k / f"test_2016_flickr.{lang}.gz", "rt", encoding="utf-8") as f:
            (trained / f"test.{lang}").write_text("".join(next(f) for _ in range(40)), encoding="utf-8")
    lines = (trained / "test.de").read_text(encoding="utf-8").splitlines()
    best = "run/checkpoints/best.pt"
    hyps = mtkit("translate", "-m", best, "--greedy", "--input", "test.de", cwd=trained).stdout.splitlines()
    scores = mtkit("evaluate", "--ref", "test.en", "--json", cwd=trained, stdin="\n".join(hyps) + "\n").stdout
    (trained / "eval.json").write_text(scores)
    mtkit("export", "-m", best, "--format", "hf", "--eval", "flickr=eval.json", "--license", "cc-by-4.0",
          "hf", cwd=trained)
    card = (trained / "hf" / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "transformers" and "translation" in meta["tags"]
    assert meta["language"] == ["de", "en"] and meta["license"] == "cc-by-4.0"
    metrics = {m["type"]: m for m in meta["model-index"][0]["results"][0]["metrics"]}
    assert metrics["bleu"]["value"] == pytest.approx(json.loads(scores)["bleu"], abs=0.01)
    assert metrics["chrf"]["args"]["signature"] == json.loads(scores)["signature"]["chrf"]

    assert hf_translate(load_hf(trained / "hf"), lines, beam_size=1) == hyps  # reloaded from disk
    model, vocab, _, _ = load_model(trained / best)
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(trained / "hf").eval()
    src = pad(vocab.encode_src(lines), suffix=EOS)
    tgt_in = pad(vocab.encode_tgt(hyps), prefix=BOS)
    with torch.no_grad():
        a = model.eval()(src, tgt_in)
        b = theirs(input_ids=src, attention_mask=src != PAD, decoder_input_ids=tgt_in).logits
    real = tgt_in != PAD
    assert (a[real] - b[real]).abs().max().item() < 1e-4

    if importlib.util.find_spec("ctranslate2") is not None:  # the same card beside a CTranslate2 model
        mtkit("export", "-m", best, "--eval", "flickr=eval.json", "ct2", cwd=trained)
        ct2_card = (trained / "ct2" / "README.md").read_text(encoding="utf-8")
        ct2_meta = yaml.safe_load(ct2_card.split("---\n")[1])
        assert ct2_meta["library_name"] == "ctranslate2" and ct2_meta["model-index"] == meta["model-index"]

    mtkit("import", "--format", "hf", "hf", "imported", cwd=trained)
    back = mtkit("translate", "-m", "imported", "--input", "test.de", cwd=trained).stdout
    assert back == mtkit("translate", "-m", best, "--input", "test.de", cwd=trained).stdout


@pytest.mark.parametrize("args, stdin, needle", [
    (["prepare", "missing.yaml"], None, "missing.yaml: config file not found"),
    (["train", "run.yaml", "--set", "model.layers=3"], None, "did you mean 'n_layers'"),
    (["translate", "-m", "nowhere"], "x\n", "nowhere: no such checkpoint"),
    (["evaluate", "--ref", "data/train.en"], "only one line\n",
     f"has 1 lines but data/train.en has {N_TRAIN}"),
    (["translate", "-m", "run"], "bad \udcff\n", "line 1: invalid UTF-8"),
    (["export", "-m", "run", "--format", "onnx", "out"], None, "--format 'onnx': ctranslate2 or hf"),
    (["export", "-m", "run", "--eval", "flickr", "out"], None, "NAME=FILE"),
    (["import", "--format", "hf", "nowhere", "out"], None, "nowhere: not a transformers model directory"),
])
def test_user_mistakes_get_one_line_and_exit_2(trained, args, stdin, needle):
    if stdin is not None:
        stdin_bytes = stdin.encode("utf-8", "surrogateescape")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        proc = subprocess.run([sys.executable, "-m", "mtkit", *args], cwd=trained, input=stdin_bytes,
                              capture_output=True, env=env, timeout=300)
        stderr = proc.stderr.decode()
    else:
        proc = mtkit(*args, cwd=trained, check=False)
        stderr = proc.stderr
    assert proc.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("mtkit: error:")]
    assert len(errors) == 1 and needle in errors[0], stderr
    assert "Traceback" not in stderr
