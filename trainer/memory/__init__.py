"""Memory you can plan: what each rank will hold, planned before launch from the config alone, and
what it did hold, phase by phase, recorded during the run.

- `shapes`: the task's model on the meta device, its parameters and the activations of a micro-batch;
- `estimate`: the per-rank arithmetic of each ZeRO stage (DeepSpeed 0.19.7's buffers included);
- `check`: the plan as `--check` prints it, the memory this node has, the verdict and the smallest fix;
- `recorder` and `census`: each phase's peak per rank and what the engine holds, into memory.json;
- `host`: the process's resident set and its peak, the node's RAM, glibc's allocator.
"""
