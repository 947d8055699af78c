from .reference import paged_decode_attention  # replaced by the Triton kernel module
