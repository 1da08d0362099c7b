"""Training-throughput benchmark: mtkit's training step against Hugging Face `transformers`
(MarianMTModel of the same dimensions) on the same batches, in one invocation.

    python scripts/bench_train.py [CONFIG] [--set KEY=VALUE ...] [--steps 20] [--warmup 3]
        [--repeats 3] [--max-tokens N] [--device auto|cpu|cuda] [--peak-tflops X]
        [--out results/bench_train.json] [--no-peer] [--peer-compile]

Run from the repository root (config paths are relative to it). Prints a table on stdout, logs on
stderr, writes the figures as JSON; top-level "ratio" = mtkit / peer target tokens/s.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchlib import finish, machine
from mtkit.config import ModelConfig, RunConfig, load_config
from mtkit.data.batching import collate, token_batches
from mtkit.data.shards import PreparedData
from mtkit.data.vocab import BOS, EOS, PAD
from mtkit.device import Precision, choose_precision, pick_device
from mtkit.engine import (
    CPU_AUTO_MAX_TOKENS,
    ComputeContext,
    Dist,
    make_optimizer,
    probe_max_tokens,
    train_step,
    wrap_model,
)
from mtkit.model import Transformer, count_parameters
from mtkit.train import learning_rate

log = logging.getLogger("bench_train")

DEFAULT_CONFIG = "configs/quickstart_cpu.yaml"
# dense bf16: measured on the machine, and the spec sheet
H100_BF16_TFLOPS = {"measured_790": 790.0, "spec_989": 989.0}
H200_BF16_TFLOPS = {"spec_989": 989.0}  # same tensor cores as the H100; no measured peak here
FLOPS_FORMULA = ("6 * (P_enc * sum(S) + (P_dec + V * d) * sum(T)) "
                 "+ 12 * d * sum(L_enc * S^2 + L_dec * (T^2 + S * T)); "
                 "P_enc = L(4d^2 + 2 d d_ff), P_dec = L(8d^2 + 2 d d_ff); S, T real lengths incl. EOS/BOS")
INSTALL_PEER = 'pip install "transformers>=4.40"'


@dataclass
class Batches:
    """Collated batches on the device, one per optimizer step, and per-step counts of what they hold."""

    micro: list[list[dict[str, torch.Tensor]]]  # per step: the micro-batches train_step takes
    tgt_tokens: list[int]  # non-pad target tokens incl. EOS: train_step's n_tokens
    src_tokens: list[int]  # non-pad source tokens incl. EOS
    padded: list[int]  # padded source + target positions
    sentences: list[int]
    flops: list[float]  # model FLOPs (FLOPS_FORMULA)

    def part(self, steps: slice) -> Batches:
        return Batches(*(getattr(self, f.name)[steps] for f in dataclasses.fields(self)))


@dataclass
class System:
    """One side of the comparison: what train_step drives, and its running state."""

    name: str
    step_model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: object  # re-enterable context manager: ComputeContext or torch.autocast
    parameters: int
    step: int = 0
    parts: int = 1


@dataclass
class Setup:
    """What is benchmarked where: the resolved config, device, precision, batch budget, vocabulary."""

    cfg: RunConfig
    norm_in_config: str  # model.norm before it was forced to post
    device: torch.device
    precision: Precision
    max_tokens: int
    vocab: tuple[int, int]  # source, target


class MarianAdapter(nn.Module):
    """MarianMTModel behind mtkit's forward(src, tgt_in) -> logits, so `train_step` drives both."""

    def __init__(self, marian: nn.Module):
        super().__init__()
        self.marian = marian

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        mask = (src != PAD).long()  # (B, S), what a transformers tokenizer hands the model
        out = self.marian(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in, use_cache=False)
        return out.logits  # (B, T, V)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"run config (default {DEFAULT_CONFIG})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set model.n_layers=1")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repeat (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per system (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per system, alternated (default 3)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="token budget per batch (default train.max_tokens; auto: 4096 on CPU, "
                        "probed on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where to run (default train.device of the config)")
    p.add_argument("--out", type=Path, default=Path("results/bench_train.json"), help="JSON result file")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s for MFU (default: H100 bf16 790 measured and 989 spec; none on CPU)")
    p.add_argument("--no-peer", action="store_true", help="time mtkit alone (no transformers)")
    p.add_argument("--peer-compile", action="store_true",
                   help="torch.compile the peer as well (default: eager, as transformers' Trainer runs it)")
    args = p.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def load_run_config(path: str, overrides: list[str]) -> tuple[RunConfig, str]:
    """The config with $MTKIT_DATA as data.dir (--set wins over it), model.norm forced to post."""
    env = [f"data.dir={os.environ['MTKIT_DATA']}"] if os.environ.get("MTKIT_DATA") else []
    cfg = load_config(path, env + overrides)
    norm_in_config = cfg.model.norm
    # MarianMTModel is post-norm (the paper's LayerNorm(x + Sublayer(x))), so both run post-norm.
    cfg.model = dataclasses.replace(cfg.model, norm="post")
    return cfg, norm_in_config


def prepared_data(cfg: RunConfig) -> PreparedData:
    """The prepared training data, running `mtkit prepare` first when its directory is missing."""
    if not Path(cfg.data.prepared_dir).exists():
        from mtkit.prepare import prepare

        log.info("%s missing: preparing it from %s", cfg.data.prepared_dir, cfg.data.dir)
        prepare(cfg)
    return PreparedData(cfg.data.prepared_dir)


def step_flops(src_lens: np.ndarray, tgt_lens: np.ndarray, m: ModelConfig, vocab: int) -> float:
    """FLOPS_FORMULA over real (non-pad) tokens; lengths here already count EOS / BOS."""
    d, L, S, T = m.d_model, m.n_layers, src_lens.astype(np.float64), tgt_lens.astype(np.float64)
    p_enc = L * (4 * d * d + 2 * d * m.d_ff)
    p_dec = L * (8 * d * d + 2 * d * m.d_ff)
    dense = 6 * (p_enc * S.sum() + (p_dec + vocab * d) * T.sum())
    attention = 12 * d * (L * (S * S).sum() + L * (T * T + S * T).sum())
    return float(dense + attention)


def make_batches(data: PreparedData, cfg: RunConfig, max_tokens: int, count: int, vocab: int,
                 device: torch.device) -> Batches:
    """The first `count` batches of mtkit train's first epoch (cycled if fewer), collated on the device."""
    src, tgt = data.split("train")
    order = token_batches(src.lengths, tgt.lengths, max_tokens, np.random.default_rng(cfg.train.seed))
    out = Batches([], [], [], [], [], [])
    for i in range(count):
        idx = order[i % len(order)]
        batch = collate([src[j] for j in idx], [tgt[j] for j in idx])
        out.micro.append([{k: v.to(device) for k, v in batch.items()}])
        s, t = src.lengths[idx] + 1, tgt.lengths[idx] + 1  # + EOS on the source, + EOS/BOS on the target
        out.tgt_tokens.append(int(t.sum()))
        out.src_tokens.append(int(s.sum()))
        out.padded.append(len(idx) * int(s.max() + t.max()))
        out.sentences.append(len(idx))
        out.flops.append(step_flops(s, t, cfg.model, vocab))
    return out


def build_mtkit(cfg: RunConfig, vocab: tuple[int, int], device: torch.device,
                precision: Precision) -> tuple[System, Transformer]:
    """Exactly what `mtkit train` builds: model, fused Adam, compile wrapper, autocast context."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model, *vocab).to(device)
    optimizer = make_optimizer(model, cfg.train)
    step_model = wrap_model(model, cfg.train, device, Dist())
    step_model.train()
    return System("mtkit", step_model, optimizer, ComputeContext(device, precision),
                  count_parameters(model)), model


def build_peer(cfg: RunConfig, vocab: tuple[int, int], device: torch.device, precision: Precision,
               compile_: bool) -> System:
    """MarianMTModel with mtkit's dimensions, tied embeddings, special ids and dropout; SDPA attention."""
    from transformers import MarianConfig, MarianMTModel

    m = cfg.model
    config = MarianConfig(
        vocab_size=vocab[0], decoder_vocab_size=vocab[1], d_model=m.d_model,
        max_position_embeddings=m.max_positions, encoder_layers=m.n_layers, decoder_layers=m.n_layers,
        encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads, encoder_ffn_dim=m.d_ff,
        decoder_ffn_dim=m.d_ff, activation_function="relu", scale_embedding=True,
        share_encoder_decoder_embeddings=m.share_embeddings, tie_word_embeddings=m.share_embeddings,
        pad_token_id=PAD, eos_token_id=EOS, forced_eos_token_id=EOS, bos_token_id=None,
        decoder_start_token_id=BOS, dropout=m.dropout, attention_dropout=m.attention_dropout,
        activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(cfg.train.seed)
    adapter = MarianAdapter(MarianMTModel(config)).to(device)
    adapter.train()
    optimizer = make_optimizer(adapter, cfg.train)  # the same fused Adam(W), betas and eps
    step_model = torch.compile(adapter, dynamic=True) if compile_ else adapter
    autocast = torch.autocast(device.type, dtype=precision.dtype, enabled=precision.dtype is not None)
    return System("peer", step_model, optimizer, autocast, count_parameters(adapter))


def resolve_max_tokens(args: argparse.Namespace, cfg: RunConfig, model: Transformer, data: PreparedData,
                       device: torch.device, precision: Precision) -> int:
    """--max-tokens, else train.max_tokens; auto: 4096 on CPU, on CUDA the probe `mtkit train` runs."""
    if args.max_tokens is not None:
        return args.max_tokens
    if cfg.train.max_tokens != "auto":
        return cfg.train.max_tokens
    if device.type != "cuda":
        return CPU_AUTO_MAX_TOKENS
    longest = int(max(a.lengths.max() for a in data.split("train"))) + 1
    return probe_max_tokens(model, device, longest, ComputeContext(device, precision), data.vocab.src_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(system: System, batches: Batches, cfg: RunConfig, device: torch.device) -> tuple[float, float]:
    """train_step over the given steps with the paper's schedule; (seconds, loss per token of the last)."""
    t = cfg.train
    sync(device)
    start = time.perf_counter()
    for micro, n in zip(batches.micro, batches.tgt_tokens):
        system.step += 1
        lr = learning_rate(system.step, cfg.model.d_model, t.warmup_steps, t.lr_factor, t.lr_decay,
                           t.max_steps)
        out, system.parts = train_step(system.step_model, system.optimizer, micro, n, 1, lr, t,
                                       system.autocast, system.parts)
    sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, float(out["loss"]) / n


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM of this process from /proc (Linux), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    """Hand memory freed by the other system back to the OS (glibc), so RSS starts from live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak: CUDA allocator stats, or Linux's VmHWM (clear_refs 5); False if it cannot."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    _trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _rss_mb("VmHWM") is not None
    except OSError:
        return False


def peak_memory_mb(device: torch.device, resettable: bool) -> float:
    """CUDA: max_memory_allocated; CPU: peak RSS since the reset, else the process's (getrusage)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if resettable:
        return _rss_mb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def memory_kind(device: torch.device, resettable: bool) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated, reset before each repeat"
    if resettable:
        return ("peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim before each repeat); "
                "it includes both systems' weights and optimizer states: compare peak_over_repeat_start_mb")
    return "peak RSS of the whole process (resource.getrusage ru_maxrss), both systems together"


def benchmark(systems: list[System], batches: Batches, args: argparse.Namespace, cfg: RunConfig,
              device: torch.device) -> dict[str, dict]:
    """Warm up every system, then time them alternately (A B A B ...) over the same steps."""
    warm, timed = batches.part(slice(0, args.warmup)), batches.part(slice(args.warmup, None))
    for system in systems:
        log.info("warming up %s: %d untimed steps", system.name, args.warmup)
        if args.warmup:
            run_steps(system, warm, cfg, device)
    raw = {s.name: {"seconds": [], "peak_mb": [], "start_mb": [], "loss": []} for s in systems}
    for r in range(args.repeats):
        for system in systems:
            resettable = reset_peak_memory(device)
            start_mb = _rss_mb("VmRSS") if device.type == "cpu" else None
            seconds, loss = run_steps(system, timed, cfg, device)
            rec = raw[system.name]
            rec["seconds"].append(seconds)
            rec["peak_mb"].append(peak_memory_mb(device, resettable))
            rec["start_mb"].append(start_mb)
            rec["loss"].append(loss)
            rec["memory_kind"] = memory_kind(device, resettable)
            log.info("repeat %d/%d %s: %.2f s for %d steps", r + 1, args.repeats, system.name, seconds,
                     args.steps)
    return raw


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(system: System, rec: dict, timed: Batches, peaks: dict[str, float], steps: int) -> dict:
    """Throughput, step time, memory and MFU of one system from its repeats."""
    secs, tgt_tokens, src_tokens = rec["seconds"], sum(timed.tgt_tokens), sum(timed.src_tokens)
    tgt = [tgt_tokens / s for s in secs]
    both = [(src_tokens + tgt_tokens) / s for s in secs]
    flops_per_s = statistics.median(sum(timed.flops) / s for s in secs)
    memory = {"peak_mb": max(rec["peak_mb"]), "kind": rec["memory_kind"]}
    if all(m is not None for m in rec["start_mb"]):
        memory["peak_over_repeat_start_mb"] = max(p - s for p, s in zip(rec["peak_mb"], rec["start_mb"]))
    return {
        "parameters": system.parameters,
        "tgt_tokens_per_s": spread(tgt),
        "src_tgt_tokens_per_s": spread(both),
        "step_time_s": spread([s / steps for s in secs]),
        "repeat_seconds": secs,
        "model_tflops_per_s": flops_per_s / 1e12,
        "mfu": {name: flops_per_s / (peak * 1e12) for name, peak in peaks.items()} or None,
        "memory": memory,
        "loss_per_token_last_step": rec["loss"][-1],
        "batches_split_on_oom": system.parts,
    }


def peak_tflops(args: argparse.Namespace, device: torch.device, precision: Precision) -> dict[str, float]:
    """Peaks that MFU is reported against; empty (MFU null) on CPU unless --peak-tflops."""
    if args.peak_tflops is not None:
        return {"given": args.peak_tflops}
    if device.type == "cuda" and precision.name == "bf16":
        name = torch.cuda.get_device_name(device)
        if "H100" in name:
            return dict(H100_BF16_TFLOPS)
        if "H200" in name:
            return dict(H200_BF16_TFLOPS)
    return {}


def peer_info(compiled: bool) -> dict:
    import transformers

    return {"name": "transformers", "version": transformers.__version__, "model": "MarianMTModel",
            "attn_implementation": "sdpa", "compiled": compiled}


def report(result: dict) -> str:
    """The human-readable table."""
    r, setup = result, result["setup"]
    lines = [f"bench_train: {setup['config']} | {setup['device']} {setup['precision']} | "
             f"max_tokens {setup['max_tokens']} | {setup['steps']} steps x {setup['repeats']} repeats "
             f"(+{setup['warmup']} warm-up), alternated",
             f"model: d_model {setup['model']['d_model']}, "
             f"{setup['model']['n_layers']}+{setup['model']['n_layers']} layers, "
             f"{setup['model']['n_heads']} heads, d_ff {setup['model']['d_ff']}, "
             f"vocab {setup['vocab_size']}; "
             f"norm=post for both (MarianMTModel is post-norm; the config says {setup['norm_in_config']})",
             f"machine: {r['machine'].get('gpu') or r['machine']['cpu']}, "
             f"{r['machine']['torch_threads']} torch threads"
             + (f" | peer: transformers {r['peer']['version']} MarianMTModel (sdpa)" if r["peer"] else ""),
             f"batches: {setup['sentences_per_step']:.0f} sentences, "
             f"{setup['tgt_tokens_per_step']:.0f} target tokens per step; "
             f"padding ratio {setup['padding_ratio']:.3f}; {setup['flops_per_step'] / 1e9:.1f} GFLOP/step",
             "",
             f"{'system':<7} {'tgt tok/s  med [min, max]':>30} {'src+tgt tok/s':>14} "
             f"{'step ms  med [min, max]':>26} {'peak MB':>9} {'MFU':>14} {'loss/tok':>9}"]
    for name, s in r["systems"].items():
        tok, step = s["tgt_tokens_per_s"], s["step_time_s"]
        mfu = ", ".join(f"{v:.1%}" for v in s["mfu"].values()) if s["mfu"] else "n/a"
        lines.append(f"{name:<7} {tok['median']:>10.0f} [{tok['min']:>7.0f}, {tok['max']:>7.0f}] "
                     f"{s['src_tgt_tokens_per_s']['median']:>14.0f} "
                     f"{step['median'] * 1e3:>8.1f} [{step['min'] * 1e3:>6.1f}, {step['max'] * 1e3:>6.1f}] "
                     f"{s['memory']['peak_mb']:>9.0f} {mfu:>14} {s['loss_per_token_last_step']:>9.3f}")
    if r["ratio"] is not None:
        per = ", ".join(f"{x:.2f}" for x in r["ratio_per_repeat"])
        lines.append(f"\nratio mtkit/peer, target tokens/s: {r['ratio']:.3f} "
                     f"(per repeat: {per}; above 1 = mtkit faster)")
    mfu_peaks = (", ".join(f"{k} {v:g} TFLOP/s" for k, v in r["peak_tflops"].items())
                 or "none (pass --peak-tflops)")
    lines.append(f"MFU peaks: {mfu_peaks}; memory: {next(iter(r['systems'].values()))['memory']['kind']}")
    return "\n".join(lines)


def check_peer(no_peer: bool) -> bool:
    """False (with the install command on stderr) when the peer is wanted but not importable."""
    if no_peer:
        return True
    try:
        import transformers  # noqa: F401
        from transformers import MarianConfig, MarianMTModel  # noqa: F401
    except ImportError as exc:
        print(f"bench_train: error: the peer needs Hugging Face transformers ({exc}); install it with\n"
              f"    {INSTALL_PEER}\nor pass --no-peer to time mtkit alone", file=sys.stderr)
        return False
    return True


def setup_dict(args: argparse.Namespace, setup: Setup, timed: Batches) -> dict:
    """What was benchmarked: config, model, batches and FLOPs per step."""
    real = sum(timed.src_tokens) + sum(timed.tgt_tokens)
    compile_ = setup.cfg.train.compile
    return {"config": str(args.config), "overrides": args.overrides, "device": setup.device.type,
            "precision": setup.precision.name, "max_tokens": setup.max_tokens, "steps": args.steps,
            "warmup": args.warmup, "repeats": args.repeats, "model": dataclasses.asdict(setup.cfg.model),
            "norm_in_config": setup.norm_in_config, "vocab_size": setup.vocab[1],
            "mtkit_compiled": compile_ is True or (compile_ == "auto" and setup.device.type == "cuda"),
            "sentences_per_step": sum(timed.sentences) / args.steps,
            "tgt_tokens_per_step": sum(timed.tgt_tokens) / args.steps,
            "src_tokens_per_step": sum(timed.src_tokens) / args.steps,
            "padding_ratio": 1 - real / max(sum(timed.padded), 1),
            "flops_per_step": sum(timed.flops) / args.steps, "flops_formula": FLOPS_FORMULA}


NOTES = [
    "Both systems run the same collated batches, already on the device: data loading is not timed.",
    "Both are driven by mtkit.engine.train_step (label_smoothed_loss, fused Adam, no clipping unless "
    "train.clip_norm); the peer is MarianMTModel behind a forward(src, tgt_in) -> logits adapter.",
    "mtkit runs under ComputeContext (autocast in the chosen precision; SDPA math kernel on CPU); "
    "the peer under plain torch.autocast with SDPA's default kernel choice, "
    "as a transformers user would run it.",
    "Model FLOPs count non-pad tokens only; MFU = model FLOP/s / peak.",
]


def run(args: argparse.Namespace) -> dict:
    """Build both systems on the same data, time them, and assemble the result."""
    cfg, norm_in_config = load_run_config(args.config, args.overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(args.device or cfg.train.device)
    precision = choose_precision(cfg.train.precision, device)
    data = prepared_data(cfg)
    vocab = (data.vocab.src_size, data.vocab.tgt_size)
    mtkit_system, model = build_mtkit(cfg, vocab, device, precision)
    max_tokens = resolve_max_tokens(args, cfg, model, data, device, precision)
    batches = make_batches(data, cfg, max_tokens, args.warmup + args.steps, vocab[1], device)
    systems = [mtkit_system]
    if not args.no_peer:
        systems.append(build_peer(cfg, vocab, device, precision, args.peer_compile))
    log.info("device %s, %s (%s); %d tokens per batch; systems: %s", device, precision.name, precision.reason,
             max_tokens, ", ".join(f"{s.name} ({s.parameters:,} parameters)" for s in systems))
    raw = benchmark(systems, batches, args, cfg, device)
    timed = batches.part(slice(args.warmup, None))
    peaks = peak_tflops(args, device, precision)
    setup = Setup(cfg, norm_in_config, device, precision, max_tokens, vocab)
    summaries = {s.name: summarize(s, raw[s.name], timed, peaks, args.steps) for s in systems}
    ratio, per_repeat = None, []
    if "peer" in raw:
        per_repeat = [p / m for m, p in zip(raw["mtkit"]["seconds"], raw["peer"]["seconds"])]
        ratio = (summaries["mtkit"]["tgt_tokens_per_s"]["median"]
                 / summaries["peer"]["tgt_tokens_per_s"]["median"])
    return {"benchmark": "train", "ratio": ratio, "ratio_metric": "target tokens/s, mtkit / peer (medians)",
            "ratio_per_repeat": per_repeat, "peer": None if args.no_peer else peer_info(args.peer_compile),
            "machine": machine(device), "setup": setup_dict(args, setup, timed),
            "peak_tflops": peaks, "systems": summaries, "notes": NOTES,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="bench_train: %(message)s")
    if not check_peer(args.no_peer):
        return 2
    return finish("bench_train", lambda: run(args), report, args.out)


if __name__ == "__main__":
    sys.exit(main())
