"""The sbatch scripts: valid bash, and a parallel layout that tiles their nodes x GPUs."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_qwen.config import build_config
from megatron_qwen.training.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["pretrain_1p8b.sh", "pretrain_7b.sh", "pretrain_14b.sh", "code_pretrain_7b.sh",
           "code_pretrain_14b.sh"]


def settings(script: Path) -> dict:
    """#SBATCH directives and the NAME=${NAME:-default} settings at the top of a script."""
    text = script.read_text()
    out = {m[0]: m[1] for m in re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M)}
    out.update({m[0]: m[1] for m in re.findall(r"^(\w+)=\$\{\1:-([^}]*)\}", text, re.M)})
    return out


@pytest.mark.parametrize("name", SCRIPTS + ["common.sh"])
def test_bash_syntax(name):
    subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], check=True)


@pytest.mark.parametrize("name", SCRIPTS)
def test_layout_fits_the_allocation_and_the_recipe(name):
    s = settings(REPO / "slurm" / name)
    gpus = int(s["nodes"]) * int(s["gpus-per-node"])
    assert s["GPUS_PER_NODE"] == s["gpus-per-node"]
    tp, pp, mbs, gbs = (int(s[k]) for k in ("TP", "PP", "MICRO_BATCH", "GLOBAL_BATCH"))
    assert s["signal"].startswith("B:USR1@") and "requeue" in (REPO / "slurm" / name).read_text()
    recipe = yaml.safe_load((REPO / s["RECIPE"]).read_text())
    cfg = build_config(PretrainConfig, recipe, {"parallel": {"tensor_model_parallel_size": tp,
                                                             "pipeline_model_parallel_size": pp},
                                                "train": {"micro_batch_size": mbs, "global_batch_size": gbs}})
    dp = cfg.check_world(gpus)  # raises with the reason if TP x PP or the batch do not divide
    assert tp <= int(s["gpus-per-node"])  # tensor parallelism stays inside a node (NVLink)
    assert gbs * cfg.model.seq_length == 2048 * 2048 or gbs * cfg.model.seq_length == 512 * 8192  # 4M tokens
    assert cfg.num_microbatches(dp) >= 1
    # the recipe's own layout is what the script launches
    assert recipe["parallel"]["tensor_model_parallel_size"] == tp
    assert recipe["train"]["micro_batch_size"] == mbs and recipe["train"]["global_batch_size"] == gbs


def test_shared_launcher_rejects_a_layout_that_does_not_tile(tmp_path):
    script = (f"source {REPO}/slurm/common.sh; TP=3 PP=1 GLOBAL_BATCH=2048 MICRO_BATCH=1 check_layout 16")
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 2 and "TP=3 x PP=1 does not divide the 16 GPUs" in proc.stderr
