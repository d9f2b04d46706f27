"""The course's two models: an MLP and a tiny transformer whose projections are named like an LLM's.

Both expose ``model.blocks`` (an ``nn.ModuleList``, bottom to top) and ``model.head`` (the classifier), so
freezing, partial unfreezing and LoRA targeting work the same on either. Both support activation
checkpointing with ``set_activation_checkpointing(True)`` (``use_reentrant=False``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["MLP", "TinyTransformer", "PROJECTIONS", "Attention", "TransformerBlock"]


class _Checkpointable(nn.Module):
    activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool = True) -> _Checkpointable:
        """Recompute each block's activations in backward instead of storing them (less memory, ~1 extra forward)."""
        self.activation_checkpointing = bool(enabled)
        return self

    def _run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False)
            else:
                h = block(h)
        return h


class MLP(_Checkpointable):
    """``in_features -> hidden[0] -> ... -> n_classes`` with ReLU and optional dropout after each hidden layer.

    Input ``(B, in_features)`` or ``(B, 1, 8, 8)`` (flattened); output logits ``(B, n_classes)``.
    """

    def __init__(self, in_features: int = 64, hidden=(256, 256), n_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        if in_features <= 0 or n_classes <= 0 or not hidden or any(h <= 0 for h in hidden):
            raise ValueError(f"in_features, n_classes and every hidden size must be positive, got "
                             f"in_features={in_features}, hidden={hidden}, n_classes={n_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        sizes = (in_features, *hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(sizes[-1], n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._run_blocks(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class Attention(nn.Module):
    """Multi-head self-attention with separate ``q_proj k_proj v_proj o_proj`` (each ``d_model x d_model``).

    ``softmax(Q K^T / sqrt(d_head)) V`` per head, via ``F.scaled_dot_product_attention``. ``(B, T, D) -> (B, T, D)``.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        heads = [p(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
                 for p in (self.q_proj, self.k_proj, self.v_proj)]
        out = F.scaled_dot_product_attention(*heads, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, D))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h + attn(norm1(h))`` then ``h + down_proj(gelu(up_proj(norm2(h))))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.up_proj = nn.Linear(d_model, d_ff)
        self.down_proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.attn(self.norm1(h)))
        return h + self.drop(self.down_proj(F.gelu(self.up_proj(self.norm2(h)))))


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
"""The six ``nn.Linear`` names of every ``TinyTransformer`` block, as in an LLM: LoRA on "all projections"."""


class TinyTransformer(_Checkpointable):
    """A small encoder over image patches (default) or token sequences, with a ``[CLS]`` token and a head.

    Images: input ``(B, image_size**2)`` or ``(B, 1, image_size, image_size)`` is cut into
    ``(image_size / patch_size)**2`` patches of ``patch_size**2`` pixels, each projected to ``d_model``.
    Tokens (``vocab_size`` given): input long ``(B, T)`` with ``T <= max_len``, embedded to ``d_model``.
    A learned position embedding (initial std ``pos_std``, default ``1/sqrt(d_model)``) is added, a ``[CLS]``
    token prepended, ``n_layers`` pre-norm blocks run, and ``head(norm(h[:, 0]))`` gives logits
    ``(B, n_classes)``.

    Each block has ``attn.q_proj attn.k_proj attn.v_proj attn.o_proj`` (``d_model -> d_model``), ``up_proj``
    (``d_model -> d_ff``) and ``down_proj`` (``d_ff -> d_model``), so LoRA ``target_modules`` mean what they
    mean for an LLM. Build it under ``with torch.device("meta"):`` to count parameters at LLM sizes.
    """

    def __init__(self, *, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, d_ff: int | None = None,
                 n_classes: int = 10, dropout: float = 0.0, image_size: int = 8, patch_size: int = 2,
                 vocab_size: int | None = None, max_len: int = 64, pos_std: float | None = None):
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        for name, value in (("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers), ("d_ff", d_ff),
                            ("n_classes", n_classes)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if pos_std is not None and not pos_std > 0:
            raise ValueError(f"pos_std must be None (1/sqrt(d_model)) or > 0, got {pos_std!r}")
        self.vocab_size, self.d_model = vocab_size, d_model
        if vocab_size is None:
            if image_size % patch_size:
                raise ValueError(f"image_size ({image_size}) must be divisible by patch_size ({patch_size})")
            self.image_size, self.patch_size = image_size, patch_size
            n_pos = (image_size // patch_size) ** 2
            self.embed = nn.Linear(patch_size * patch_size, d_model)
        else:
            if vocab_size <= 0 or max_len <= 0:
                raise ValueError(f"vocab_size and max_len must be positive, got {vocab_size}, {max_len}")
            n_pos = max_len
            self.embed = nn.Embedding(vocab_size, d_model)
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        pos = torch.randn(1, n_pos, d_model)
        self.pos = nn.Parameter(pos / math.sqrt(d_model) if pos_std is None else pos * float(pos_std))
        self.blocks = nn.ModuleList(TransformerBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)

    def _patches(self, x: torch.Tensor) -> torch.Tensor:
        s, p = self.image_size, self.patch_size
        x = x.reshape(x.shape[0], s // p, p, s // p, p)           # (B, rows, p, cols, p)
        return x.permute(0, 1, 3, 2, 4).reshape(x.shape[0], -1, p * p)  # (B, n_patches, p*p)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The ``[CLS]`` representation after the final norm, ``(B, d_model)``."""
        if self.vocab_size is None:
            h = self.embed(self._patches(x))
        else:
            if x.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"token input must be an integer tensor (B, T), got {x.dtype}")
            if x.shape[1] > self.pos.shape[1]:
                raise ValueError(f"sequence length {x.shape[1]} exceeds max_len={self.pos.shape[1]}")
            h = self.embed(x)
        h = h + self.pos[:, :h.shape[1]]
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], dim=1)
        return self.norm(self._run_blocks(h)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
