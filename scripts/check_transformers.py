"""Does the installed `transformers` translate an mtkit export as mtkit does? Exports a model with
`mtkit export --format hf` into a temporary directory, loads it from disk as a transformers user would
(AutoTokenizer, AutoModelForSeq2SeqLM, and `pipeline("translation")` where the version has it: 4.x),
translates test_2016_flickr lines greedily one at a time with mtkit's per-sentence length limit, and
compares every line with `mtkit translate --greedy`.

    python3 scripts/check_transformers.py -m runs/quickstart [--lines 100] [--out FILE.json]

Run it once per transformers version (e.g. with another version first on PYTHONPATH); it prints the
agreement and writes it as JSON.
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchlib import publish
from mtkit.checkpoint import resolve_model
from mtkit.hf import export_hf
from mtkit.lines import output_steps
from mtkit.translate import Translator

DATA = Path(os.environ.get("MTKIT_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", default="runs/quickstart", help="checkpoint or run directory")
    parser.add_argument("--lines", type=int, default=100, help="test_2016_flickr lines to translate")
    parser.add_argument("--out", type=Path, default=Path("runs/check_transformers.json"))
    args = parser.parse_args()
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    with gzip.open(DATA / "test_2016_flickr.de.gz", "rt", encoding="utf-8") as f:
        lines = [line.rstrip("\n") for _, line in zip(range(args.lines), f)]
    translator = Translator.load(resolve_model(args.model), "cpu", beam_size=1)
    ours = translator.translate(lines)
    offset, positions = translator.decode.max_len_offset, translator.model.cfg.max_positions
    with tempfile.TemporaryDirectory() as tmp:
        out = export_hf(args.model, Path(tmp) / "hf")
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
        pipe = None
        if int(transformers.__version__.split(".")[0]) < 5:  # transformers 5 removed the task
            pipe = transformers.pipeline("translation", model=model, tokenizer=tokenizer, device="cpu")
        auto, piped = [], []
        for line in lines:
            ids = tokenizer(line, return_tensors="pt")
            limit = output_steps(ids.input_ids.size(1) - 1, offset, positions) + 1  # + the start token
            with torch.inference_mode():
                found = model.generate(**ids, num_beams=1, do_sample=False, max_length=limit)
            auto.append(tokenizer.decode(found[0], skip_special_tokens=True))
            if pipe is not None:
                piped.append(pipe(line, num_beams=1, max_length=limit)[0]["translation_text"])
    same = sum(a == b for a, b in zip(auto, ours))
    result = {"transformers": transformers.__version__, "model_class": type(model).__name__,
              "lines": len(lines), "generate_equal_lines": same,
              "pipeline_equal_lines": sum(a == b for a, b in zip(piped, ours)) if pipe else None}
    table = (f"transformers {result['transformers']} ({result['model_class']}): generate {same}/{len(lines)} "
             f"lines equal to mtkit greedy; pipeline('translation') "
             + (f"{result['pipeline_equal_lines']}/{len(lines)}" if pipe else "not in this version"))
    publish(table, result, args.out)
    if same != len(lines) or (pipe and result["pipeline_equal_lines"] != len(lines)):
        sys.exit(1)


if __name__ == "__main__":
    main()
