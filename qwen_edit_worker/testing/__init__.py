"""The tiny random Qwen-Image-Edit pipeline (`MODEL_ID=tiny-random`): tests and local runs
load it through the production `from_pretrained` path. Imports nothing of the worker's."""
