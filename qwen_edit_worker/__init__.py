"""qwen-edit-worker's code beneath the four top-level modules (handler, config, model_loader, batching).

Owns the service (`service.EditService`: one job end to end) and the checks run at start
(`startup_checks`); its sub-packages each own one concern and import only the layers below
them (`LAYERS`, checked by tests/test_layout.py). Nothing is imported here: `handler.py`
starts the weights' prefetch before anything heavy is imported.
"""

# Each entry may import itself and the entries before it, never one after it.
LAYERS = (
    ("config", "qwen_edit_worker.errors", "qwen_edit_worker.testing", "batching"),
    ("qwen_edit_worker.startup",),
    ("qwen_edit_worker.jobs",),
    ("qwen_edit_worker.loras",),
    ("qwen_edit_worker.engine",),
    ("model_loader",),
    ("qwen_edit_worker.gpus",),
    ("qwen_edit_worker.service", "qwen_edit_worker.startup_checks"),
    ("handler",),
)

__version__ = "2.1.1"  # the release CHANGES.md names first; tests/test_shipping.py keeps them equal
