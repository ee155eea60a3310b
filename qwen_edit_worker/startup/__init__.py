"""Start-up: the weights' prefetch and the image's list of start-up files, the start-up clock,
where the model's files are (`model_files`), the Lightning file baked at build time, and the
library log lines silenced. May import config and `testing` only: it runs before torch is imported."""
