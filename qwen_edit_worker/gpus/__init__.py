"""Several GPUs: which devices run batches (`gpus`), replica processes and the ranks of
context parallelism. May import everything below it, model_loader included (each process
loads its own model); the service above it decides which one a worker uses."""
