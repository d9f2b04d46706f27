"""LoRA benchmark: course_lib's LoRALinear against full fine-tuning, a frozen base and peft's LoRA.

Two models, LoRA (r=8, alpha=16) on every Linear that a learner would adapt:

* ``tiny``: TinyTransformer (d_model=256, 4 heads, 4 layers) on a batch of 64 8x8 images (17 tokens each),
  LoRA on ``q_proj k_proj v_proj o_proj up_proj down_proj``, the head fully trained (as in notebook 05).
* ``stack``: blocks of two square Linear layers (``fc1``, ``fc2``) and nothing else, so the matmuls are
  the whole cost and the ratios show what an adapter adds to them. ``--size cpu``: 4 blocks of 1024x1024,
  2048 tokens; ``--size gpu``: 8 blocks of 4096x4096, 8192 tokens (the issue's H100 reference).

Figures per model: trainable fraction; AdamW state bytes LoRA / full fine-tuning; seconds of one training
step (forward + backward + fresh grads) relative to full fine-tuning for LoRA, the frozen base (input
gradients only: the floor a LoRA step can approach) and peft's LoRA; course / peft step time; inference
time of the merged model / the base model (target 1.00 +- 0.03); the variants rsLoRA and DoRA
(``use_rslora`` / ``use_dora``, same r and alpha): course step / peft step each. Targets: CPU: course step <= peft step;
CUDA: LoRA step <= 0.80 x full step. fp32 on CPU, bf16 autocast on CUDA. The variants are interleaved
(order rotated each round); a ratio is the median over rounds of the two times measured back to back,
absolute times are the best round (bench/timing.py, which also picks 1 or 2 CPU threads by machine load).

    python -m bench.lora [--device cpu|cuda] [--size cpu|gpu] [--rounds 10] [--only tiny stack]

peft is optional: without it the peft rows say "skipped". ``run()`` returns the rows for bench/run_all.py.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from bench.timing import interleaved, print_rows, setup_cpu
from course_lib.lora import add_lora, lora_layers, merge_lora
from course_lib.models import PROJECTIONS, TinyTransformer
from course_lib.optimizers import optimizer_state_bytes

SEED, R, ALPHA = 0, 8, 16
SIZES = {"cpu": dict(width=1024, blocks=4, tokens=512), "gpu": dict(width=4096, blocks=8, tokens=8192)}
TINY, TINY_BATCH = dict(d_model=256, n_heads=4, n_layers=4), {"cpu": 16, "gpu": 256}
MERGE_TOL, GPU_TARGET, CPU_TARGET = 0.03, 0.80, 1.00


class LinearStack(nn.Module):
    """``n_blocks`` blocks of ``fc1`` and ``fc2`` (``width -> width`` Linear each), applied in sequence.

    Input ``(N, width)`` -> output ``(N, width)``. No activation: only the matmuls cost anything.
    """

    def __init__(self, width: int, n_blocks: int):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(OrderedDict(fc1=nn.Linear(width, width), fc2=nn.Linear(width, width)))
                                    for _ in range(n_blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Case:
    """One model to benchmark: how to build it, what LoRA targets, a batch and its loss."""

    def __init__(self, key, label, build, targets, train_modules, batch, loss):
        self.key, self.label, self.build, self.targets = key, label, build, targets
        self.train_modules, self.batch, self.loss = train_modules, batch, loss


def _cases(device: torch.device, size: str, dtype: torch.dtype) -> list[Case]:
    g = torch.Generator().manual_seed(SEED)
    b, s = TINY_BATCH[size], SIZES[size]
    images, labels = torch.rand(b, 64, generator=g).to(device), torch.randint(0, 10, (b,), generator=g).to(device)
    tokens = torch.randn(s["tokens"], s["width"], generator=g).to(device)
    gout = torch.randn(s["tokens"], s["width"], generator=g).div_(s["tokens"]).to(device, dtype)

    def tiny():
        torch.manual_seed(SEED)
        return TinyTransformer(**TINY).to(device)

    def stack():
        torch.manual_seed(SEED)
        return LinearStack(s["width"], s["blocks"]).to(device)

    return [
        Case("tiny", f"TinyTransformer d{TINY['d_model']} x{TINY['n_layers']}, batch {b} x 17 tok", tiny,
             PROJECTIONS, ("head",), images, lambda out: F.cross_entropy(out.float(), labels).backward()),
        Case("stack", f"stack {s['blocks']}x2 Linear {s['width']}, {s['tokens']} tok", stack, ("fc1", "fc2"), (),
             tokens, lambda out: out.backward(gout)),
    ]


VARIANTS = {"rsLoRA": {"use_rslora": True}, "DoRA": {"use_dora": True}}


def _peft_wrap(model: nn.Module, case: Case, **flags):
    """peft's LoraModel on the same layers with the same r/alpha (dropout 0), plus the same trained modules."""
    from peft import LoraConfig, LoraModel

    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", target_modules=list(case.targets),
                        **flags)
    wrapped = LoraModel(model, config, "default")
    for name in case.train_modules:
        model.get_submodule(name).requires_grad_(True)
    return wrapped


def _course_lora(case: Case, **flags) -> nn.Module:
    model = case.build()
    add_lora(model, case.targets, r=R, alpha=ALPHA, train_modules=case.train_modules, **flags)
    return model


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _step(model: nn.Module, case: Case, autocast, input_grad: bool = False):
    """A closure running one training step: fresh grads, forward under autocast, backward."""
    x = case.batch.detach().clone().requires_grad_(input_grad)
    leaves = _trainable(model) + ([x] if input_grad else [])

    def step():
        for t in leaves:
            t.grad = None
        with autocast():
            out = model(x)
        case.loss(out)
    return step


def _infer(model: nn.Module, case: Case, autocast):
    def forward():
        with torch.no_grad(), autocast():
            return model(case.batch)
    return forward


def _randomize_b(model: nn.Module) -> None:
    """Non-zero B matrices (course ``lora_B`` Parameters, peft ``lora_B`` Linear weights): merging must matter."""
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).mul_(0.02))


def _row(case, figure, value, target, ok, detail):
    return dict(bench="lora", figure=f"{case.key}: {figure}", value=value, target=target, ok=bool(ok), detail=detail)


def _bench_case(case: Case, device, env: dict, rounds: int, iters: int, use_peft: bool) -> list[dict]:
    cuda, autocast = device.type == "cuda", env["autocast"]
    full, frozen, course = case.build(), case.build(), _course_lora(case)
    frozen.requires_grad_(False)
    models = {"full": full, "frozen": frozen, "course": course}
    if use_peft:
        peft_model = case.build()
        _peft_wrap(peft_model, case)
        models["peft"] = peft_model
    total = sum(p.numel() for p in full.parameters())
    layers = len(lora_layers(course))
    n_train = {k: sum(p.numel() for p in _trainable(m)) for k, m in models.items() if k != "frozen"}

    steps = {k: _step(m, case, autocast, input_grad=(k == "frozen")) for k, m in models.items()}
    tm = interleaved(steps, rounds, iters, env["sync"], env["clock"])
    t = tm.best

    state = {}
    for k in n_train:  # one real AdamW step: the state it allocates
        steps[k]()
        opt = torch.optim.AdamW(_trainable(models[k]), lr=1e-4)
        opt.step()
        state[k] = optimizer_state_bytes(opt)
        del opt
    del steps, models, full, frozen, course

    rows = []
    rows.append(_row(case, "trainable fraction (course_lib LoRA)", round(n_train["course"] / total, 5), "reported",
                     True, f"{n_train['course']:,} of {total:,} parameters; {layers} LoRA layers r={R}, "
                     f"train_modules={list(case.train_modules)} ({case.label})"))
    rows.append(_row(case, "AdamW state bytes LoRA / full", round(state["course"] / state["full"], 5), "reported", True,
                     f"{state['course']:,} B vs {state['full']:,} B"))
    ms = {k: v * 1e3 for k, v in t.items()}
    timing = ", ".join(f"{k} {v:.2f} ms" for k, v in ms.items())
    lora_full = tm.ratio("course", "full")
    rows.append(_row(case, "step time LoRA / full", round(lora_full, 3),
                     f"<= {GPU_TARGET:.2f}" if cuda else "reported", lora_full <= GPU_TARGET or not cuda,
                     f"median of {rounds} paired rounds of {iters}; best: {timing} ({env['note']})"))
    rows.append(_row(case, "step time frozen base (input grads) / full", round(tm.ratio("frozen", "full"), 3),
                     "reported", True, "the floor of a LoRA step: no weight gradients at all"))
    if use_peft:
        rows.append(_row(case, "trainable fraction (peft LoRA)", round(n_train["peft"] / total, 5),
                         "= course_lib", n_train["peft"] == n_train["course"], f"{n_train['peft']:,} of {total:,}"))
        rows.append(_row(case, "AdamW state bytes peft / course_lib", round(state["peft"] / state["course"], 5),
                         "= 1", state["peft"] == state["course"], f"{state['peft']:,} B"))
        rows.append(_row(case, "step time peft LoRA / full", round(tm.ratio("peft", "full"), 3), "reported", True, ""))
        ratio = tm.ratio("course", "peft")
        rows.append(_row(case, "step time course_lib LoRA / peft LoRA", round(ratio, 3),
                         "reported" if cuda else f"<= {CPU_TARGET:.2f}", cuda or ratio <= CPU_TARGET,
                         f"course {ms['course']:.2f} ms, peft {ms['peft']:.2f} ms"))
    else:
        rows.append(_row(case, "peft comparison", None, "skipped", True, "peft is not installed"))
    return rows + _bench_merge(case, env, rounds, iters, use_peft) + _bench_variants(case, env, rounds, iters, use_peft)


def _bench_variants(case: Case, env: dict, rounds: int, iters: int, use_peft: bool) -> list[dict]:
    """One training step of course_lib's rsLoRA and DoRA against peft's (``use_rslora`` / ``use_dora``)."""
    if not use_peft:
        return [_row(case, "rsLoRA / DoRA vs peft", None, "skipped", True, "peft is not installed")]
    cuda, autocast = env["sync"] is not None, env["autocast"]
    steps = {}
    for name, flags in VARIANTS.items():
        theirs = case.build()
        _peft_wrap(theirs, case, **flags)
        steps[f"course {name}"] = _step(_course_lora(case, **flags), case, autocast)
        steps[f"peft {name}"] = _step(theirs, case, autocast)
    tm = interleaved(steps, rounds, iters, env["sync"], env["clock"])
    rows = []
    for name in VARIANTS:
        ratio = tm.ratio(f"course {name}", f"peft {name}")
        ms = {k: tm.best[f"{k} {name}"] * 1e3 for k in ("course", "peft")}
        rows.append(_row(case, f"step time course_lib {name} / peft {name}", round(ratio, 3),
                         "reported" if cuda else f"<= {CPU_TARGET:.2f}", cuda or ratio <= CPU_TARGET,
                         f"course {ms['course']:.2f} ms, peft {ms['peft']:.2f} ms"))
    return rows


def _bench_merge(case: Case, env: dict, rounds: int, iters: int, use_peft: bool) -> list[dict]:
    """Inference of the merged model against the base model it came from (same layers, so ratio ~1)."""
    autocast = env["autocast"]
    base = case.build().eval()
    adapted = _course_lora(case).eval()
    _randomize_b(adapted)
    with torch.no_grad(), autocast():
        unmerged_out = adapted(case.batch).float()
    merged = merge_lora(adapted)
    with torch.no_grad(), autocast():
        merge_err = (merged(case.batch).float() - unmerged_out).abs().max().item()
    fns = {"base": _infer(base, case, autocast), "course merged": _infer(merged, case, autocast),
           "course unmerged": _infer(_randomized_lora(case), case, autocast)}
    if use_peft:
        p = case.build().eval()
        wrapped = _peft_wrap(p, case)
        _randomize_b(p)
        fns["peft merged"] = _infer(wrapped.merge_and_unload(), case, autocast)
    tm = interleaved(fns, 2 * rounds, iters, env["sync"], env["clock"])  # forward only: cheap
    t = tm.best
    rows = []
    for key, label in (("course merged", "course_lib"), ("peft merged", "peft")):
        if key in t:
            ratio = tm.ratio(key, "base")
            rows.append(_row(case, f"inference merged / base ({label})", round(ratio, 3), f"1.00 +- {MERGE_TOL:.2f}",
                             abs(ratio - 1) <= MERGE_TOL, f"base {t['base'] * 1e3:.2f} ms, merged {t[key] * 1e3:.2f} ms"
                             + (f"; max |merged - unmerged| = {merge_err:.1e}" if key == "course merged" else "")))
    rows.append(_row(case, "inference unmerged LoRA / base (course_lib)", round(tm.ratio("course unmerged", "base"), 3),
                     "reported", True, "what merging saves"))
    return rows


def _randomized_lora(case: Case) -> nn.Module:
    model = _course_lora(case).eval()
    _randomize_b(model)
    return model


def run(device: str = "cpu", size: str | None = None, rounds: int = 10, only=("tiny", "stack"),
        threads: int | None = None) -> list[dict]:
    """Rows (bench, figure, value, target, ok, detail) for each model in ``only``."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device is 'cuda' but torch.cuda.is_available() is False: use --device cpu")
    size = size or ("gpu" if dev.type == "cuda" else "cpu")
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if dev.type == "cpu":
        env = dict(setup_cpu(threads), autocast=contextlib.nullcontext, sync=None)
        dtype = torch.float32
    else:
        env = dict(autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16), sync=torch.cuda.synchronize,
                   clock="wall", note=f"{torch.cuda.get_device_name(dev)}, bf16 autocast")
        dtype = torch.bfloat16
    try:
        import peft  # noqa: F401
        use_peft = True
    except ImportError:
        use_peft = False
    rows = []
    for case in _cases(dev, size, dtype):
        if case.key in only:
            iters = 3 if case.key == "tiny" or dev.type == "cuda" else 1
            rows += _bench_case(case, dev, env, rounds, iters, use_peft)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", choices=sorted(SIZES), help="stack size (default: gpu on cuda, else cpu)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--only", nargs="*", default=["tiny", "stack"], choices=["tiny", "stack"])
    p.add_argument("--threads", type=int, help="CPU threads (default: 2, or 1 on a busy machine; bench/timing.py)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.device, args.size, args.rounds, args.only, args.threads)
    status = print_rows(rows)
    print(f"{time.perf_counter() - start:.1f} s, torch {torch.__version__}, device {args.device}")
    return status


if __name__ == "__main__":
    sys.exit(main())
