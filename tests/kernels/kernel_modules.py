"""The kernel modules the conftest reloads for the Triton interpreter, in reload order."""

# Reload order: a module comes after the kernel modules it imports names from.
KERNEL_MODULES = (
    "kvferry.kernels._triton",
    "kvferry.kernels.attention_common",
    "kvferry.kernels.store_kv",
    "kvferry.kernels.kv_transfer",
    "kvferry.kernels.decode_attention",
    "kvferry.kernels.prefill_attention",
    "kvferry.kernels.rms_norm",
    "kvferry.kernels.rotary",
)
