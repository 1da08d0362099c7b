"""sacreBLEU scoring (BLEU, chrF, TER) with signatures; validation BLEU uses the same function."""

from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF, TER

from mtkit.errors import UserError


def score(hyps: list[str], refs: list[list[str]], names: tuple[str, list[str]] | None = None,
          metrics: tuple[str, ...] = ("bleu", "chrf", "ter")) -> dict:
    """Corpus scores of `hyps` against one or more reference streams.

    Cased, detokenized, 13a tokenization: sacreBLEU's defaults, the comparable setting.
    `names` = (hypothesis name, reference names) for the line-count error message.
    """
    hyp_name, ref_names = names or ("hypotheses", [f"reference {i + 1}" for i in range(len(refs))])
    for ref, ref_name in zip(refs, ref_names):
        if len(ref) != len(hyps):
            raise UserError(f"{hyp_name} has {len(hyps)} lines but {ref_name} has {len(ref)}: "
                            "counts must match before scoring")
    result: dict = {"n_sentences": len(hyps), "signature": {}}
    scorers = {"bleu": BLEU, "chrf": CHRF, "ter": TER}
    for name in metrics:
        metric = scorers[name]()
        value = metric.corpus_score(hyps, refs)
        result[name] = round(value.score, 2)
        result["signature"][name] = str(metric.get_signature())
        if name == "bleu":
            result["bleu_detail"] = str(value)
    return result


def format_report(result: dict) -> str:
    """Human-readable lines: each score followed by its signature."""
    lines = []
    for name in ("bleu", "chrf", "ter"):
        if name in result:
            lines.append(f"{name.upper():5s} {result[name]:6.2f}   {result['signature'][name]}")
    if "bleu_detail" in result:
        lines.append(result["bleu_detail"])
    return "\n".join(lines)
