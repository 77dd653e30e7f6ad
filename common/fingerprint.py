"""The compatibility fingerprint: what must agree between two processes for KV blocks and token ids to
mean the same on both sides. Checked at the KV handshake (prefill worker against decode worker) and at
registration (worker against the cluster); a refusal names every differing field."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

PROTOCOL_VERSION = 2  # 2: trailers carry per-layer checksums; data planes negotiated at handshake
KV_LAYOUT = "[2,num_blocks,block_size,num_kv_heads,head_dim]"
# Bytes per element of the KV dtypes, by name: the fingerprint sizes payloads without importing torch.
DTYPE_ITEMSIZE = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` (or ``"bfloat16"``) -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVFingerprint:
    """One worker's model, KV layout and protocol; ``LLMEngine.fingerprint`` makes a worker's."""

    model_name: str = ""
    model_digest: str = ""  # sha256 (16 hex digits) of every field of the model config
    dtype: str = ""  # of the KV cache: "bfloat16", "float32", ...
    block_size: int = 0  # tokens per KV block
    kv_layout: str = ""
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    max_model_len: int = 0  # longest prompt + output the worker accepts
    protocol_version: int = PROTOCOL_VERSION

    # Fields two sides may differ in without breaking anything: the router serves the smallest context.
    TOLERATED = ("max_model_len",)

    @classmethod
    def from_model(cls, model_config, dtype: object, block_size: int, max_model_len: int = 0) -> KVFingerprint:
        """``model_config``: a frozen ``ModelConfig`` dataclass; every field goes into the digest."""
        fields = dataclasses.asdict(model_config)
        config_hash = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
        return cls(
            model_name=model_config.name,
            model_digest=config_hash[:16],
            dtype=dtype_name(dtype),
            block_size=block_size,
            kv_layout=KV_LAYOUT,
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            vocab_size=model_config.vocab_size,
            max_model_len=max_model_len,
        )

    def _checked(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if f.name not in self.TOLERATED]

    def differences(self, theirs: KVFingerprint, ours_name: str = "sender", theirs_name: str = "receiver") -> list[str]:
        """One line per differing field that must agree, e.g. ``dtype: sender 'bfloat16', receiver 'float32'``."""
        out = []
        for name in self._checked():
            a, b = getattr(self, name), getattr(theirs, name)
            if a != b:
                out.append(f"{name}: {ours_name} {a!r}, {theirs_name} {b!r}")
        return out

    @property
    def digest(self) -> str:
        """Equal for two fingerprints exactly when ``differences`` is empty."""
        text = json.dumps({name: getattr(self, name) for name in self._checked()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def layer_nbytes(self, num_blocks: int) -> int:
        """Bytes of one layer's payload for ``num_blocks`` blocks (K and V)."""
        if self.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"unknown KV dtype {self.dtype!r}; known: {', '.join(DTYPE_ITEMSIZE)}")
        return 2 * num_blocks * self.block_size * self.num_kv_heads * self.head_dim * DTYPE_ITEMSIZE[self.dtype]
