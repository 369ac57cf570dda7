"""xpert-dist: sparse, domain-adapted experts from one LoRA fine-tuning run (EfficientXpert), at cluster scale."""
from setuptools import find_packages, setup

# Pinned, mutually compatible versions (verified together on CPU; see README "Install").
# torch must stay pinned: an unpinned torch pulls a multi-GB CUDA build on CPU machines.
REQUIRES = [
    "torch==2.13.0",
    "deepspeed==0.19.8",
    "transformers==5.24.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "accelerate==1.15.0",
    "submitit==1.5.4",
    "sentencepiece==0.2.3",
    "safetensors>=0.6",
    "gguf==0.19.0",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "numpy>=1.26",
    "psutil>=5.9",
]

setup(
    name="xpert-dist",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else __doc__,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["xpert_dist", "xpert_dist.*"]),
    package_data={"xpert_dist": ["data/samples/*", "data/samples/*/*", "plan/model_configs/*.json", "eval/lm_eval_tasks/*.yaml"]},
    python_requires=">=3.10",
    install_requires=REQUIRES,
    extras_require={
        "quant": ["bitsandbytes==0.50.2"],
        "track": ["tensorboard==2.21.0"],  # TensorBoard event files of every run (on when installed)
        "dev": ["pytest==9.2.0", "bitsandbytes==0.50.2", "tensorboard==2.21.0"],
        "eval": ["lm_eval[hf]==0.4.13"],
    },
    entry_points={"console_scripts": ["xpert-dist=xpert_dist.cli:main"]},
)
