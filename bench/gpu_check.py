#!/usr/bin/env python
"""The GPU check: every headline path once, small, on one GPU, in one table (issue: GPU nodes).

Runs as subprocesses, each through the real entry point with its default flags where the check
is about defaults:
  data      a real corpus (CPython's sources) tokenized by tools/preprocess_data.py; arithmetic
            conversations, preference pairs and prompts
  pretrain  Qwen-1.8B's recipe at reduced depth, bf16, the distributed optimizer and the recipe's
            attention backend (flash when flash-attn is installed, else SDPA: the table says which);
            save at iteration 3 and stop, resume to 6, and an uninterrupted run to 6: losses of
            iterations 4-6 must be identical
  sft       the 7B SFT recipe at reduced depth with packing, on its backend
  convert   mcore-to-hf of the pretrained checkpoint (the HF model RM and PPO start from)
  rm / ppo  2 steps each, DeepSpeed over NCCL (world size 1 still goes through NCCL)
  generate / eval_ppl   default flags on the converted checkpoint
  mfu       bench/mfu.py for Qwen-1.8B, ours vs the HF peer
  te        bench/te_check.py: TE spec vs local spec loss on the same weights (SKIP without TE)
  varlen    bench/varlen_attention.py: the selected THD kernel against the per-document reference
  ckpt_io   bench/checkpoint_io.py: save/load time and host peak, fully_reshardable vs dp_reshardable
  memory_plan  bench/plan_memory_check.py --quick: the memory plan vs torch.cuda.max_memory_allocated
`--cpu` runs the same chain at the tiny size on CPU (gloo, fp32): how the script itself is tested.

    bash bench/gpu_check.sh [--cpu] [--out DIR] [--only pretrain,sft]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Result:
    step: str
    status: str  # PASS, FAIL, SKIP
    seconds: float
    detail: str = ""


@dataclass
class Check:
    out: Path
    cpu: bool
    results: list = field(default_factory=list)
    budget_s: float = 480.0
    start: float = field(default_factory=time.perf_counter)

    def run(self, step: str, cmd: list, timeout: int, env: dict | None = None) -> tuple[bool, str]:
        """Run one command; its whole output goes to OUT/logs/STEP.log."""
        log = self.out / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        left = self.budget_s - (time.perf_counter() - self.start)
        timeout = int(max(10, min(timeout, left)))
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
                    "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
        cmd = [str(c) for c in cmd]
        with log.open("w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            try:
                proc = subprocess.run(cmd, cwd=REPO, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                      timeout=timeout)
                ok = proc.returncode == 0
                why = "" if ok else f"exit {proc.returncode}"
            except subprocess.TimeoutExpired:
                ok, why = False, f"timed out after {timeout} s"
        text = log.read_text(errors="replace")
        if not ok:
            why = f"{why}: {first_error(text)[:200]}"
        return ok, text if ok else why

    def record(self, step: str, t0: float, ok: bool, detail: str) -> bool:
        self.results.append(Result(step, "PASS" if ok else "FAIL", time.perf_counter() - t0, detail))
        print(f"[gpu_check] {step}: {'PASS' if ok else 'FAIL'} {detail}", flush=True)
        return ok

    def skip(self, step: str, why: str) -> None:
        self.results.append(Result(step, "SKIP", 0.0, why))
        print(f"[gpu_check] {step}: SKIP {why}", flush=True)


_ERROR = re.compile(r"^(error: |\w*(Error|Exception)\b[:(])")


def first_error(log: str) -> str:
    """The line that says what went wrong: the program's own `error:` line, else its exception
    (torchrun's ChildFailedError wrapper, which says nothing, is skipped)."""
    lines = [re.sub(r"^\[rank\d+\]: ", "", ln.strip()) for ln in log.splitlines() if ln.strip()]
    hits = [ln for ln in lines if _ERROR.match(ln) and "ChildFailedError" not in ln]
    return (hits or lines[-1:] or [""])[0]


def torchrun(*args) -> list:
    return [PY, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
            f"--master-port={29400 + os.getpid() % 500}", *args]


def has(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


# ------------------------------------------------------------------ data


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    return f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {a + b + rng.randint(1, 9)}."


def write_jsonl(path: Path, rows) -> None:
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def build_data(check: Check) -> dict:
    from megatron_qwen.data.real_corpus import python_sources

    d = check.out / "data"
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    write_jsonl(d / "corpus.jsonl", python_sources(max_bytes=4_000_000 if not check.cpu else 1_000_000))
    convs, pairs, prompts = [], [], []
    for _ in range(400):
        q, good, bad = arithmetic(rng)
        convs.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": good}]})
        pairs.append({"prompt": [{"role": "user", "content": q}], "chosen": good, "rejected": bad})
        prompts.append({"prompt": q})
    write_jsonl(d / "sft.jsonl", convs)
    write_jsonl(d / "pairs_train.jsonl", pairs[:320])
    write_jsonl(d / "pairs_test.jsonl", pairs[320:])
    write_jsonl(d / "prompts.jsonl", prompts)
    return {"dir": d, "corpus": d / "corpus_text_document"}


# ------------------------------------------------------------------ steps


def losses(metrics_file: Path) -> dict:
    out = {}
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            rec = json.loads(line)
            if "lm_loss" in rec:
                out[rec["iteration"]] = rec["lm_loss"]
    return out


def pretrain_args(check: Check, data: dict, backend: str) -> list:
    if check.cpu:
        return ["--config", "examples/pretrain_tiny.yaml", "--seq-length", "128", "--micro-batch-size", "2",
                "--global-batch-size", "4", "--num-workers", "0"]
    return ["--config", "examples/pretrain_1p8b.yaml", "--num-layers", "2", "--seq-length", "2048",
            "--micro-batch-size", "1", "--global-batch-size", "2", "--bf16", "--attention-backend", backend,
            "--tensor-model-parallel-size", "1", "--num-workers", "1"]


def step_pretrain(check: Check, data: dict, backend: str) -> Path | None:
    """Save at 3 and stop, resume to 6, against one uninterrupted run to 6: identical losses."""
    common = [*pretrain_args(check, data, backend), "--data-path", data["corpus"], "--split", "100,0,0",
              "--data-cache-path", check.out / "cache", "--use-distributed-optimizer", "--train-iters", "6",
              "--lr-warmup-iters", "1", "--log-interval", "1", "--eval-interval", "none", "--save-interval", "3",
              "--wandb-project", "none", "--tensorboard-dir", check.out / "tb" / "pretrain"]
    ck, ref = check.out / "ckpt" / "pretrain", check.out / "ckpt" / "pretrain_ref"
    m1, m2, mref = (check.out / f"pretrain_{n}.jsonl" for n in ("first", "resumed", "ref"))
    t0 = time.perf_counter()
    ok, why = check.run("pretrain_save", torchrun("pretrain_qwen.py", *common, "--save", ck, "--load", ck,
                                                  "--exit-interval", "3", "--metrics-file", m1), 240)
    if not check.record("pretrain (bf16, dist. optimizer, save at 3)" if not check.cpu else "pretrain (save at 3)",
                        t0, ok, f"backend {backend}; losses {fmt(losses(m1))}" if ok else why):
        return None
    t0 = time.perf_counter()
    ok, why = check.run("pretrain_resume", torchrun("pretrain_qwen.py", *common, "--save", ck, "--load", ck,
                                                    "--metrics-file", m2), 240)
    ok2, why2 = (check.run("pretrain_ref", torchrun("pretrain_qwen.py", *common, "--save", ref, "--load", ref,
                                                     "--metrics-file", mref), 240) if ok else (False, why))
    resumed, straight = losses(m2), losses(mref)
    same = ok and ok2 and resumed and all(i in resumed and resumed[i] == straight.get(i) for i in (4, 5, 6))
    detail = (f"iterations 4-6 resumed {fmt(resumed)} vs uninterrupted {fmt(straight)}"
              if ok and ok2 else (why if not ok else why2))
    check.record("resume (losses identical)", t0, bool(same), detail)
    return ck


def fmt(d: dict) -> str:
    return ", ".join(f"{k}:{v:.4f}" for k, v in sorted(d.items())) or "none"


def step_sft(check: Check, data: dict, backend: str) -> None:
    t0 = time.perf_counter()
    m = check.out / "sft.jsonl"
    size = (["--config", "examples/sft_tiny.yaml", "--seq-length", "256", "--micro-batch-size", "2",
             "--global-batch-size", "4"] if check.cpu else
            ["--config", "examples/sft_7b.yaml", "--num-layers", "2", "--seq-length", "2048",
             "--tensor-model-parallel-size", "1", "--sequence-parallel", "false", "--micro-batch-size", "1",
             "--global-batch-size", "2", "--attention-backend", backend])
    ok, why = check.run("sft", torchrun(
        "pretrain_qwen.py", *size, "--task", "sft", "--sft-packing", "true", "--sft-data-path",
        data["dir"] / "sft.jsonl", "--pretrained-checkpoint", "none", "--save", check.out / "ckpt" / "sft",
        "--load", check.out / "ckpt" / "sft", "--train-iters", "3", "--lr-warmup-iters", "1",
        "--log-interval", "1", "--eval-interval", "none", "--num-workers", "0",
        "--tensorboard-dir", check.out / "tb" / "sft", "--wandb-project", "none", "--metrics-file", m), 240)
    l = losses(m)
    check.record("sft (packing)", t0, ok and len(l) == 3, f"backend {backend}; losses {fmt(l)}" if ok else why)


def step_convert(check: Check, ck: Path) -> Path | None:
    t0 = time.perf_counter()
    hf = check.out / "hf" / "base"
    ok, why = check.run("convert", [PY, "tools/convert_checkpoint.py", "mcore-to-hf", "--mcore", ck, "--out", hf], 180)
    check.record("mcore-to-hf", t0, ok, str(hf) if ok else why)
    return hf if ok else None


def step_rm(check: Check, data: dict, hf: Path) -> Path | None:
    t0 = time.perf_counter()
    export = check.out / "hf" / "rm"
    bf16 = "false" if check.cpu else "true"
    ok, why = check.run("rm", torchrun(
        "tools/train_reward_model.py", "--config", "examples/rm_tiny_cpu.yaml", "--model-path", hf,
        "--train-data-path", data["dir"] / "pairs_train.jsonl", "--test-data-path", data["dir"] / "pairs_test.jsonl",
        "--seq-length", "128", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--zero-stage", "2", "--bf16", bf16, "--save", check.out / "ckpt" / "rm", "--export-dir", export,
        "--log-interval", "1", "--eval-interval", "2", "--tensorboard-dir", check.out / "tb" / "rm"), 240)
    acc = re.findall(r"accuracy[ =:]+([0-9.]+)", why if not ok else why)
    check.record("reward model (2 steps, ZeRO-2" + (", NCCL)" if not check.cpu else ")"), t0, ok,
                 (f"held-out accuracy {acc[-1]}" if acc else "trained and exported") if ok else why)
    return export if ok else None


def step_ppo(check: Check, data: dict, hf: Path, rm: Path) -> None:
    t0 = time.perf_counter()
    bf16 = "false" if check.cpu else "true"
    ok, why = check.run("ppo", torchrun(
        "tools/train_ppo.py", "--config", "examples/ppo_tiny_cpu.yaml", "--actor-path", hf, "--reward-path", rm,
        "--prompt-data-path", data["dir"] / "prompts.jsonl", "--ptx-data-path", data["corpus"],
        "--prompts-per-step", "2", "--mini-batch-size", "4", "--max-new-tokens", "16", "--train-iters", "2",
        "--value-warmup-steps", "1", "--bf16", bf16, "--actor-zero-stage", "3", "--critic-zero-stage", "3",
        "--save", check.out / "ckpt" / "ppo", "--export-dir", check.out / "hf" / "ppo",
        "--tensorboard-dir", check.out / "tb" / "ppo"), 300)
    check.record("ppo (2 steps, 4 engines, ZeRO-3" + (", NCCL)" if not check.cpu else ")"), t0, ok,
                 "actor exported" if ok else why)


def step_generate(check: Check, ck: Path) -> None:
    t0 = time.perf_counter()
    out = check.out / "generate.jsonl"
    ok, why = check.run("generate", [PY, "tools/generate.py", "--load", ck, "--prompt", "def fibonacci(n):",
                                     "--max-new-tokens", "16", "--output", out], 180)
    check.record("generate (default flags)", t0, ok and out.is_file(), "wrote " + out.name if ok else why)


def step_eval_ppl(check: Check, data: dict, ck: Path) -> None:
    t0 = time.perf_counter()
    out = check.out / "ppl.json"
    seqs = "128,256" if check.cpu else "2048,8192"
    ok, why = check.run("eval_ppl", [PY, "tools/eval_ppl.py", "--load", ck, "--data", data["dir"] / "corpus.jsonl",
                                     "--seq-lengths", seqs, "--num-samples", "2", "--output", out], 240)
    detail = why
    if ok and out.is_file():
        table3 = json.loads(out.read_text())["perplexity"]
        detail = "; ".join(f"{name} " + ", ".join(f"{n}: {v:.1f}" for n, v in row.items())
                           for name, row in list(table3.items())[:2])
    check.record("eval_ppl (default flags)", t0, ok and out.is_file(), detail)


def step_mfu(check: Check) -> None:
    t0 = time.perf_counter()
    ok, text = check.run("mfu", torchrun("bench/mfu.py", "--steps", "5", "--warmup", "2"), 180)
    line = [ln for ln in text.splitlines() if "MFU" in ln][-1:] if ok else []
    check.record("mfu Qwen-1.8B, ours vs HF peer" if not check.cpu else "mfu (CPU smoke)", t0, ok and bool(line),
                 (line[0].strip() if line else "no MFU line") if ok else text)


def step_te(check: Check) -> None:
    t0 = time.perf_counter()
    ok, text = check.run("te", torchrun("bench/te_check.py"), 180)
    line = [ln for ln in text.splitlines() if ln.startswith("te_check:")][-1:] if ok else []
    if line and " SKIP " in line[0]:
        return check.skip("TE spec vs local spec", line[0].split("SKIP ", 1)[1])
    check.record("TE spec vs local spec (loss, same weights)", t0, ok and bool(line), line[0] if line else text)


def step_varlen(check: Check) -> None:
    t0 = time.perf_counter()
    ok, text = check.run("varlen", [PY, "bench/varlen_attention.py", *(["--cpu"] if check.cpu else [])], 240)
    lines = [ln.strip() for ln in text.splitlines() if ln.startswith("varlen ")]
    check.record("varlen THD kernels vs reference", t0, ok and bool(lines), "; ".join(lines) if lines else text)


def step_memory_plan(check: Check) -> None:
    """Planned vs measured peak (torch.cuda.max_memory_allocated on a GPU): two megatron-core and
    two ZeRO cases on one rank; the CPU tests hold the ratios within 15% on gloo processes."""
    t0 = time.perf_counter()
    ok, text = check.run("memory_plan", [PY, "bench/plan_memory_check.py", "--quick", "--nproc", "1"], 240)
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in text.splitlines()
            if ln.startswith("| ") and not ln.startswith("| case")] if ok else []
    ratios = [float(r[3]) for r in rows if len(r) >= 4]
    detail = "; ".join(f"{r[0]}: {r[1]} planned / {r[2]} measured MiB = {r[3]}" for r in rows)
    check.record("memory plan vs measured peak", t0, ok and bool(ratios) and all(0.85 <= x <= 1.15 for x in ratios),
                 detail if rows else text)


def step_ckpt_io(check: Check) -> None:
    t0 = time.perf_counter()
    size = ["--hidden", "128", "--layers", "2", "--vocab", "2048"] if check.cpu else \
        ["--hidden", "2048", "--layers", "8", "--vocab", "32000"]
    ok, text = check.run("ckpt_io", [PY, "bench/checkpoint_io.py", "--nproc", "1", *size], 240)
    lines = [" ".join(c.strip() for c in ln.strip().strip("|").split("|")) for ln in text.splitlines()
             if ln.startswith("| ") and ("reshardable" in ln or "async" in ln)]
    check.record("checkpoint save/load (one rank)", t0, ok and bool(lines), "; ".join(lines[-3:]) if lines else text)


# ------------------------------------------------------------------ main


def environment() -> str:
    import torch
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    parts = [f"{dev}", f"torch {torch.__version__}", f"python {sys.version.split()[0]}"]
    for mod in ("megatron.core", "deepspeed", "transformer_engine", "flash_attn"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            parts.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception:  # noqa: BLE001 - absent or broken: either way, not used
            parts.append(f"{mod} absent")
    return ", ".join(parts)


def table(results: list, env: str) -> str:
    lines = [f"GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {env}", "",
             "| step | status | s | detail |", "|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.step} | {r.status} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="the same chain, tiny, on CPU (tests the script)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="work and result directory")
    p.add_argument("--only", default="", help="comma list of: pretrain,sft,rm,ppo,generate,eval_ppl,mfu,te,varlen,ckpt_io,memory_plan")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting steps after this many seconds")
    args = p.parse_args()
    import torch
    if not args.cpu and not torch.cuda.is_available():
        print("error: no GPU visible (torch.cuda.is_available() is False); use --cpu to test the script", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    shutil.rmtree(out / "ckpt", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    check = Check(out=out, cpu=args.cpu, budget_s=args.budget_s)
    only = set(filter(None, args.only.split(",")))
    want = lambda s: not only or s in only  # noqa: E731
    env = environment()
    print(f"[gpu_check] {env}", flush=True)
    if args.cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("MEGATRON_QWEN_DEVICE", "cpu")
    backend = "sdpa" if args.cpu else ("flash" if has("flash_attn") else "sdpa")

    t0 = time.perf_counter()
    data = build_data(check)
    ok, why = check.run("tokenize", [PY, "tools/preprocess_data.py", "--input", data["dir"] / "corpus.jsonl",
                                     "--output-prefix", data["dir"] / "corpus", "--json-keys", "text",
                                     "--append-eod", "--workers", "2"], 180)
    if not check.record("data (tokenize a real corpus)", t0, ok, "CPython sources" if ok else why):
        print(table(check.results, env))
        return 1
    ck = step_pretrain(check, data, backend) if want("pretrain") or not only else None
    if want("sft"):
        step_sft(check, data, backend)
    needs_ck = [s for s in ("rm", "ppo", "generate", "eval_ppl") if want(s)]
    if needs_ck and ck is None:
        ck = step_pretrain(check, data, backend)
    if ck is not None:
        if want("generate"):
            step_generate(check, ck)
        if want("eval_ppl"):
            step_eval_ppl(check, data, ck)
        hf = step_convert(check, ck) if (want("rm") or want("ppo")) else None
        rm = step_rm(check, data, hf) if hf and (want("rm") or want("ppo")) else None
        if hf and rm and want("ppo"):
            step_ppo(check, data, hf, rm)
    if want("mfu"):
        step_mfu(check)
    if want("te"):
        step_te(check)
    if want("varlen"):
        step_varlen(check)
    if want("ckpt_io"):
        step_ckpt_io(check)
    if want("memory_plan"):
        step_memory_plan(check)
    text = table(check.results, env)
    (out / "gpu_check.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    return 0 if all(r.status != "FAIL" for r in check.results) else 1


if __name__ == "__main__":
    sys.exit(main())
