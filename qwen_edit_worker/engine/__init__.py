"""The GPU engine: the batched edit loop (`edit_engine`), the prompt budget, attention and RoPE,
context-parallel attention, fp8, compilation and its cache, the side stream, the device.
May import config, errors, startup and loras; never the job schema's parsing."""
