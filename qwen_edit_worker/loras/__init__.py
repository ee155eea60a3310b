"""LoRAs: reading and checking files (`lora_files`), fetching and keeping them (`lora_store`),
loading through diffusers (`loading`) and the adapters and hot-swap slots on the transformer
(`adapters`). May import config, errors, startup and jobs (safe fetching, the LoRA entry)."""
