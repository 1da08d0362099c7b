"""`translate`: streaming through a pipe, batch equals one-by-one, long lines cut at punctuation,
int8 quantisation, and the attention pictures and alignments."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, WORDS, untrained_checkpoint
from mtkit.attention import hard_alignment, pharaoh
from mtkit.lines import pieces
from mtkit.translate import Translator

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("translate"))


def random_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(0, 9))) for _ in range(n)]


def test_ten_thousand_lines_through_a_pipe_keep_count_and_order(checkpoint):
    lines = random_lines(10_000)
    data = "".join(f"{line}\n" for line in lines).encode()
    proc = subprocess.run([sys.executable, "-m", "mtkit", "translate", "-m", str(checkpoint), "--greedy"],
                          input=data, capture_output=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    out = proc.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == 10_000
    translator = Translator.load(checkpoint, "cpu", beam_size=1)
    sample = random.Random(1).sample(range(10_000), 40)
    assert [out[i] for i in sample] == translator.translate([lines[i] for i in sample])  # line i is input i's
    assert all(out[i] == "" for i, line in enumerate(lines) if not line)


def test_output_starts_before_the_input_ends(checkpoint):
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "-q", "translate", "-m", str(checkpoint),
                             "--window", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=ENV)
    try:
        proc.stdin.write(b"the dog runs\na red house\nthe cat\n")
        proc.stdin.flush()
        first = [proc.stdout.readline(), proc.stdout.readline()]  # stdin is still open
        assert all(line.endswith(b"\n") for line in first)
    finally:
        proc.stdin.close()
        rest = proc.stdout.read()
        proc.wait(timeout=60)
    assert proc.returncode == 0 and rest.count(b"\n") == 1


@pytest.mark.parametrize("beam", [1, 3])
def test_a_batch_translates_as_its_lines_one_by_one(checkpoint, beam):
    translator = Translator.load(checkpoint, "cpu", beam_size=beam)
    lines = random_lines(25, seed=beam)
    assert translator.translate(lines) == [translator.translate([line])[0] for line in lines]


def running(pid: int) -> bool:
    """The process exists and has not ended (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_worker_processes_translate_as_one_process(checkpoint):
    """--workers 2: batches decode in forked processes; the same n-best lists, in input order, and
    the CLI exits cleanly (no pool noise on stderr)."""
    lines = random_lines(40, seed=7)
    one = Translator.load(checkpoint, "cpu", max_tokens=60)
    with Translator.load(checkpoint, "cpu", workers=2, max_tokens=60) as two:
        got, expected = two.translate_nbest(lines, 2), one.translate_nbest(lines, 2)
        assert two._pool.started  # the batches did go to the worker processes
        processes = list(two._pool._pool._processes.values())
    # the block's end stopped them (by /proc: the pool's own thread may reap a child first, and then
    # multiprocessing's is_alive() cannot tell)
    assert not two._pool.started and not any(running(p.pid) for p in processes)
    assert [[t for t, _ in n] for n in got] == [[t for t, _ in n] for n in expected]
    assert [[s for _, s in n] for n in got] == [[pytest.approx(s, rel=1e-5) for _, s in n] for n in expected]
    proc = subprocess.run([sys.executable, "-m", "mtkit", "-q", "translate", "-m", str(checkpoint),
                           "--workers", "2", "--max-tokens", "60"],
                          input="".join(f"{line}\n" for line in lines).encode(),
                          capture_output=True, env=ENV, timeout=300)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().split("\n")[:-1] == [n[0][0] for n in expected]


def test_a_long_line_is_cut_at_punctuation_before_the_limit(checkpoint, caplog):
    translator = Translator.load(checkpoint, "cpu")
    sentence = "the small dog runs in the red house on the street"
    text = ", ".join([sentence] * 12) + "."
    ids = translator.vocab.encode_src([text])[0]
    parts = pieces(translator.vocab, text, ids, translator.source_limit)
    assert len(ids) > translator.source_limit and len(parts) > 1
    assert all(len(p) <= translator.source_limit for p in parts)
    assert all(translator.vocab.src.decode(p).endswith(",") for p in parts[:-1])  # cut after commas
    out = translator.translate(["the dog", text, "a cat"])
    assert len(out) == 3 and "subwords exceed the model's limit" in caplog.text


def test_int8_quantisation_translates_every_line(checkpoint):
    fp32 = Translator.load(checkpoint, "cpu")
    int8 = Translator.load(checkpoint, "cpu", quantize="int8")
    assert "quantized.dynamic" in type(int8.model.encoder[0].ffn.w1).__module__
    lines = random_lines(30, seed=7)
    out = int8.translate(lines)
    assert len(out) == 30 and [o == "" for o in out] == [line == "" for line in lines]
    assert sum(a == b for a, b in zip(out, fp32.translate(lines))) >= 15  # close to fp32, not garbage


def test_attention_pictures_and_alignments(checkpoint, tmp_path):
    src = b"the dog runs\n\na small red house\n"
    proc = subprocess.run([sys.executable, "-m", "mtkit", "translate", "-m", str(checkpoint), "--attention",
                           str(tmp_path / "att"), "--alignment", str(tmp_path / "align.txt"), "--layer", "0",
                           "--head", "1"], input=src, capture_output=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == ["000001.png", "000003.png"]
    assert (tmp_path / "att" / "000001.png").read_bytes()[:4] == b"\x89PNG"
    align = (tmp_path / "align.txt").read_text().split("\n")
    hyps = proc.stdout.decode().split("\n")
    assert len(align) == len(hyps) == 4 and align[1] == ""
    translator = Translator.load(checkpoint, "cpu")
    result = translator.run(["the dog runs"])[0]
    weights = translator.cross_attention(result.src_ids, result.tgt_ids, layer=0, head=1)
    assert weights.shape == (len(result.tgt_ids) + 1, len(result.src_ids) + 1)
    assert weights.sum(-1).sub(1).abs().max() < 1e-5  # rows are distributions over the source
    pairs = [tuple(map(int, p.split("-"))) for p in align[0].split()]
    assert pairs == hard_alignment(weights) and len(pairs) == len(result.tgt_ids)
    assert all(0 <= s < len(result.src_ids) for s, _ in pairs)


def test_pharaoh_format():
    import torch

    weights = torch.tensor([[0.1, 0.8, 0.1], [0.7, 0.2, 0.1], [0.2, 0.2, 0.6]])  # 2 target, 2 source + EOS
    assert pharaoh(hard_alignment(weights)) == "1-0 0-1"


def test_a_line_translated_in_pieces_gets_its_pieces_alignments_joined(checkpoint, tmp_path):
    from mtkit.outputs import Outputs, translate_to

    translator = Translator.load(checkpoint, "cpu")
    long_line = ", ".join(["the small dog runs in the red house on the street"] * 12)
    n = translate_to(translator, ["the dog", long_line, "a cat"],
                     Outputs(output=tmp_path / "out.txt", alignment=tmp_path / "align.txt"))
    align = (tmp_path / "align.txt").read_text().split("\n")
    assert n == 3 and len(align) == 4 and align[0] and align[1] and align[2]
    result = translator.run([long_line])[0]
    assert len(result.parts) > 1
    assert [int(p.split("-")[1]) for p in align[1].split()] == list(range(len(result.tgt_ids)))
    assert len((tmp_path / "out.txt").read_text().split("\n")) == 4


def test_stopping_rules_from_the_command_line(checkpoint, tmp_path):
    """--stopping bound translates every line; an unknown rule is one error line, exit 2."""
    from test_reliability import one_error

    src = tmp_path / "in.txt"
    src.write_text("".join(f"{line}\n" for line in random_lines(12, seed=3)))
    base = [sys.executable, "-m", "mtkit", "translate", "-m", str(checkpoint), "-i", str(src)]
    bound = subprocess.run([*base, "--stopping", "bound"], capture_output=True, env=ENV, text=True)
    assert bound.returncode == 0 and len(bound.stdout.splitlines()) == 12
    one_error(subprocess.run([*base, "--stopping", "never"], capture_output=True, env=ENV, text=True),
              "--stopping 'never'", "finished or bound")
