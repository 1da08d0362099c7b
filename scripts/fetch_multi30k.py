"""Download Multi30k (task 1, de-en) through `datasets` into the layout the quickstart reads.

    python scripts/fetch_multi30k.py OUT_DIR

writes OUT_DIR/{train,val,test_2016_flickr}.{de,en}.gz from the hub dataset bentrevett/multi30k
(its test split is test_2016_flickr). Needs network access to the Hugging Face hub.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path


def main(out: Path) -> None:
    import datasets

    out.mkdir(parents=True, exist_ok=True)
    names = {"train": "train", "validation": "val", "test": "test_2016_flickr"}
    try:
        ds = datasets.load_dataset("bentrevett/multi30k")
    except Exception as exc:  # offline, hub down, renamed dataset
        sys.exit(f"fetch_multi30k: cannot load bentrevett/multi30k through datasets ({exc}); "
                 "download Multi30k yourself and set MTKIT_DATA to its directory")
    for split, name in names.items():
        for lang in ("de", "en"):
            with gzip.open(out / f"{name}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.writelines(f"{' '.join(text.split())}\n" for text in ds[split][lang])
    print(f"fetch_multi30k: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
