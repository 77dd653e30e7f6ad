"""kvferry: disaggregated prefill/decode LLM serving.

The source folders (engine/, kernels/, proto/, router/, prefill_worker/, decode_worker/, transport/,
deploy/) are installed under this namespace as ``kvferry.<folder>``.
"""

__version__ = "0.1.0"
