"""Patch memory bank: exact 1-NN over the normal shots' patch features, one index per bank layer.

A test patch's visual anomaly score is its cosine distance to the nearest bank patch, halved into
[0, 1] ((1 - cos) / 2, as PromptAD), averaged over the bank layers.
Backends: FAISS on the GPU where the installed faiss has GPU support and a GPU is present; otherwise an
exact torch matmul on the GPU (where no faiss GPU build matches torch's CUDA; it keeps the queries on the
device and is far faster than faiss-cpu there); FAISS on the CPU everywhere else.
"""
from __future__ import annotations

import io

import faiss
import numpy as np
import torch


def _faiss_gpus() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def pick_backend(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return "faiss-gpu" if _faiss_gpus() > 0 else "torch-cuda"
    return "faiss-cpu"


class MemoryBank:
    """Unit-norm patch features of one product, per layer: list of [N, C] float32."""

    def __init__(self, layers: list[np.ndarray], backend: str = "faiss-cpu"):
        if not layers:
            raise ValueError("a memory bank needs at least one layer")
        self.layers = [np.ascontiguousarray(f, dtype=np.float32) for f in layers]
        self.backend = backend
        self._index = [self._build(f) for f in self.layers]

    def _build(self, feats: np.ndarray):
        if self.backend == "torch-cuda":
            return torch.from_numpy(feats).to("cuda", torch.float16)  # [N, C]
        index = faiss.IndexFlatIP(feats.shape[1])  # inner product == cosine on unit vectors
        if self.backend == "faiss-gpu":
            index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
        index.add(feats)
        return index

    @property
    def n_patches(self) -> int:
        return self.layers[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f in self.layers)

    def distance(self, queries: list[torch.Tensor]) -> torch.Tensor:
        """Per layer [M, C] unit-norm queries -> [M] mean over layers of (1 - max cos) / 2."""
        if len(queries) != len(self._index):
            raise ValueError(f"bank has {len(self._index)} layers, got {len(queries)} query layers")
        total = None
        for q, index in zip(queries, self._index):
            if self.backend == "torch-cuda":
                cos = (q.to("cuda", torch.float16) @ index.T).amax(dim=1).float()  # [M]
            else:
                sims, _ = index.search(np.ascontiguousarray(q.detach().float().cpu().numpy()), 1)  # [M, 1]
                cos = torch.from_numpy(sims[:, 0]).to(q.device)
            d = (1.0 - cos.clamp(-1.0, 1.0)) / 2.0
            total = d if total is None else total + d
        return total / len(self._index)

    def to_bytes(self) -> bytes:
        """Layers as one .npz blob (the raw features rebuild any backend's index exactly)."""
        buf = io.BytesIO()
        np.savez(buf, *self.layers)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, backend: str = "faiss-cpu") -> "MemoryBank":
        with np.load(io.BytesIO(data)) as z:
            layers = [z[f"arr_{i}"] for i in range(len(z.files))]
        return cls(layers, backend)
