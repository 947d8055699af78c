from .reference import gather_blocks, gather_kv, scatter_blocks  # replaced by the Triton kernel module
