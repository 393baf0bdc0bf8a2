"""qwen-ft: transparent fine-tuning of Qwen vision-language models."""

import logging

# On CPUs with AVX512-BF16, bitsandbytes warns at import when the optional `kernels` package (which
# fetches kernels from the Hugging Face hub) is missing; it then uses its own CPU kernels, which work.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
