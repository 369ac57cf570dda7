"""Models: loading (local, hub, GGUF, tiny random), LoRA wrapping, block structure.

Importing this package silences one bitsandbytes warning that every run used to print: ``peft``
imports bitsandbytes unconditionally, and on CPUs with AVX512-BF16 bitsandbytes then warns that an
optional 4-bit CPU kernel ("Failed to load CPU gemm_4bit_forward ... pip install kernels") is
missing. It only matters for ``model.quantization=4bit`` on CPU, so `load_model` lets it through
(and logs it again) only then. Other bitsandbytes messages are untouched.
"""
import logging

BNB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNEL_MESSAGE = "Failed to load CPU gemm_4bit_forward"


class _QuietBnbKernel(logging.Filter):
    """Drops bitsandbytes' missing-CPU-4bit-kernel warning unless a 4-bit model is being loaded."""

    def __init__(self):
        super().__init__()
        self.allow = False
        self.dropped: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if self.allow or not str(record.msg).startswith(BNB_KERNEL_MESSAGE):
            return True
        self.dropped.append(record.getMessage())
        return False


BNB_FILTER = _QuietBnbKernel()
logging.getLogger(BNB_KERNEL_LOGGER).addFilter(BNB_FILTER)
