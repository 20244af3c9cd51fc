"""Speed and memory: time per epoch, start-up, evaluation, memory, processes and GPUs."""
