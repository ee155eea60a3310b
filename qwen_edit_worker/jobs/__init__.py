"""The job side: the input schema, safe fetching of URLs, input images, output delivery
(inline or a bucket) and the guards around the runpod SDK. May import config, errors and
startup; never the engine (a job is parsed and answered without touching the GPU's code)."""
