"""Coupled-unit groups of a CNN, found with Torch-Pruning's DependencyGraph.

:func:`find_groups` turns the graph's pruning groups into :class:`~fair_pruner.scorebook.GroupSpec`
objects (which modules produce a group's units, which consume them, which norms follow them) and
:func:`build_cost_model` states every parameter's size in terms of the units removed per group
(:mod:`fair_pruner.cost`).
"""
from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import itertools
import math
import os
import random
import signal
import threading
import time
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cost import CostBuilder, CostModel
from .engine import copy_model, first_tensor, map_tensors, structure_only
from .errors import UnsupportedModelError, env_float
from .scorebook import GroupSpec, Member, model_fingerprint

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
PRODUCER_TYPES = CONV_TYPES + (nn.Linear,)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
# Module types a pruning group may touch and that fair_pruner costs and masks exactly: each
# keeps or removes whole channels and treats every channel on its own. Anything else in a
# group (nn.MultiheadAttention, recurrent layers, ConvTranspose, GroupNorm, a customised
# pruner) is refused before scoring (:func:`find_groups`).
EXACT_TYPES = CONV_TYPES + (nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
                            nn.modules.instancenorm._InstanceNorm, nn.PReLU, nn.Embedding)
VIT_HINT = ("head pruning of vision transformers is not supported yet for this "
            "nn.MultiheadAttention (it is for torchvision's ViT and timm's ViT / DeiT attention)")
# Window / relative-position attention of torchvision (MaxViT; Swin is converted first,
# graph.convert_blocks) and timm.
WINDOW_ATTENTION = {"ShiftedWindowAttention", "ShiftedWindowAttentionV2",
                    "RelativePositionalMultiHeadAttention", "WindowAttention",
                    "WindowAttentionGlobal", "PartitionAttentionCl", "PartitionAttention2d"}


class SelfAttention(nn.Module):
    """Multi-head self-attention whose head count is free of the model width: ``qkv``
    [3 * attn_dim, dim] laid out (q|k|v, head, head_dim), ``proj`` [dim, attn_dim],
    ``attn_dim = num_heads * head_dim``. A drop-in for a self-attention
    ``nn.MultiheadAttention`` (same call, same ``(output, weights)`` result, same numbers):
    ``nn.MultiheadAttention`` ties its q/k/v width to its input width, so a pruned head count
    cannot be expressed in it. :func:`convert_blocks` swaps it in where the call pattern is
    known (torchvision's ViT)."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, qkv_bias: bool = True,
                 proj_bias: bool = True, batch_first: bool = True, dropout: float = 0.0,
                 device=None):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.batch_first, self.dropout = batch_first, float(dropout)
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias, device=device)
        self.norm, self.gate = nn.Identity(), None        # as timm's Attention (head_attention)

    @classmethod
    def from_multihead(cls, mha: nn.MultiheadAttention) -> "SelfAttention":
        """The same attention over ``mha``'s own parameter tensors (not copies: scoring rewrites
        a copy of the caller's model that shares its weights, and ViT-H/14's attention weights
        are 0.8 GB); surgery replaces them, as it does every pruned parameter."""
        E, H = mha.embed_dim, mha.num_heads
        new = cls(E, H, E // H, mha.in_proj_bias is not None, mha.out_proj.bias is not None,
                  mha.batch_first, mha.dropout, device="meta")
        new.qkv.weight, new.qkv.bias = mha.in_proj_weight, mha.in_proj_bias
        new.proj.weight, new.proj.bias = mha.out_proj.weight, mha.out_proj.bias
        new.train(mha.training)
        return new

    def forward(self, query, key=None, value=None, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        """query [B, N, dim] (``batch_first``, else [N, B, dim]); key / value: ``query`` itself
        or None. Returns (output like query, attention weights [B, N, N] averaged over heads,
        or [B, H, N, N], or None when ``need_weights=False``)."""
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise UnsupportedModelError("fair_pruner.graph.SelfAttention is self-attention "
                                        "only: key and value must be the query")
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UnsupportedModelError("fair_pruner.graph.SelfAttention takes no attention "
                                        "masks (the model it replaced was called without them)")
        if query.dim() != 3:
            raise UnsupportedModelError(f"SelfAttention needs batched [B, N, dim] input, got "
                                        f"{tuple(query.shape)}")
        x = query if self.batch_first else query.transpose(0, 1)
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            attn = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
            weights = attn.mean(dim=1) if average_attn_weights else attn
            o = F.dropout(attn, p, self.training) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = self.proj(o.transpose(1, 2).reshape(B, N, self.attn_dim))
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _convertible(parent: nn.Module, attr: str, m: nn.Module) -> bool:
    """An nn.MultiheadAttention called as self-attention without masks: torchvision's ViT
    ``EncoderBlock.self_attention`` (``self_attention(x, x, x, need_weights=False)``)."""
    cls = type(parent)
    return (isinstance(m, nn.MultiheadAttention) and attr == "self_attention"
            and cls.__module__ == "torchvision.models.vision_transformer"
            and cls.__name__ == "EncoderBlock" and m._qkv_same_embed_dim and m.bias_k is None
            and not m.add_zero_attn and m.embed_dim % m.num_heads == 0)


def _relative_bias(table: torch.Tensor, index: torch.Tensor, N: int) -> torch.Tensor:
    """[1, heads, N, N] from a [(2Wh-1)(2Ww-1), heads] table and the [N, N] (or flat) index
    of each token pair into it (torchvision's Swin and MaxViT)."""
    return table[index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)


class WindowAttention(nn.Module):
    """Shifted-window multi-head self-attention (torchvision's Swin ``ShiftedWindowAttention``
    and, with ``cosine=True``, ``ShiftedWindowAttentionV2``) with the same numbers, but with
    ``head_dim`` stored rather than derived from the input width, and ``qkv`` / ``proj`` called
    as modules (torchvision calls ``F.linear`` on their weights, which no hook sees), ``proj``
    on [B, windows * tokens, attn_dim]. Per-head parameters: the relative position bias
    table's columns (V1); ``logit_scale`` and the rows of ``cpb_mlp``'s last Linear (V2).
    V2's key bias, which torchvision zeroes in every forward, is zero from the conversion on."""

    def __init__(self, dim: int, window_size, shift_size, num_heads: int, head_dim: int,
                 qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0, cosine: bool = False):
        super().__init__()
        self.window_size, self.shift_size = list(window_size), list(shift_size)
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.attention_dropout, self.dropout, self.cosine = attention_dropout, dropout, cosine
        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias)
        self.proj = nn.Linear(self.attn_dim, dim, bias=proj_bias)
        self.norm, self.gate = nn.Identity(), None        # as timm's Attention (head_attention)

    @classmethod
    def from_torchvision(cls, m: nn.Module) -> "WindowAttention":
        import copy
        cosine = hasattr(m, "logit_scale")
        dim, H = m.qkv.in_features, m.num_heads
        new = cls(dim, m.window_size, m.shift_size, H, dim // H, m.qkv.bias is not None,
                  m.proj.bias is not None, m.attention_dropout, m.dropout, cosine)
        new.qkv, new.proj = copy.deepcopy(m.qkv), copy.deepcopy(m.proj)
        new.register_buffer("relative_position_index", m.relative_position_index.clone())
        if cosine:
            new.logit_scale = copy.deepcopy(m.logit_scale)
            new.cpb_mlp = copy.deepcopy(m.cpb_mlp)
            new.register_buffer("relative_coords_table", m.relative_coords_table.clone())
            if new.qkv.bias is not None:
                with torch.no_grad():
                    new.qkv.bias[dim:2 * dim].zero_()
        else:
            new.relative_position_bias_table = copy.deepcopy(m.relative_position_bias_table)
        new.train(m.training)
        return new

    def head_params(self):
        """(module, attribute, dim) of every parameter indexed by head besides qkv / proj."""
        if self.cosine:
            return [(self, "logit_scale", 0), (self.cpb_mlp[-1], "weight", 0)]
        return [(self, "relative_position_bias_table", 1)]

    def position_bias(self) -> torch.Tensor:
        N = self.window_size[0] * self.window_size[1]
        if self.cosine:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
            return 16 * torch.sigmoid(_relative_bias(table, self.relative_position_index, N))
        return _relative_bias(self.relative_position_bias_table, self.relative_position_index, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, H, W, dim] -> [B, H, W, dim] (torchvision's shifted_window_attention)."""
        B, Hh, Ww, C = x.shape
        ws, shift = self.window_size, list(self.shift_size)
        x = F.pad(x, (0, 0, 0, (ws[1] - Ww % ws[1]) % ws[1], 0, (ws[0] - Hh % ws[0]) % ws[0]))
        _, pH, pW, _ = x.shape
        if ws[0] >= pH:
            shift[0] = 0
        if ws[1] >= pW:
            shift[1] = 0
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        nW = (pH // ws[0]) * (pW // ws[1])
        x = x.view(B, pH // ws[0], ws[0], pW // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(B * nW, ws[0] * ws[1], C)
        N, H = x.size(1), self.num_heads
        qkv = self.qkv(x).reshape(B * nW, N, 3, H, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if self.cosine:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * self.head_dim ** -0.5).matmul(k.transpose(-2, -1))
        attn = attn + self.position_bias()
        if sum(shift) > 0:
            mask = x.new_zeros((pH, pW))
            hs = ((0, -ws[0]), (-ws[0], -shift[0]), (-shift[0], None))
            wsl = ((0, -ws[1]), (-ws[1], -shift[1]), (-shift[1], None))
            count = 0
            for h in hs:
                for w in wsl:
                    mask[h[0]:h[1], w[0]:w[1]] = count
                    count += 1
            mask = mask.view(pH // ws[0], ws[0], pW // ws[1], ws[1]).permute(0, 2, 1, 3)
            mask = mask.reshape(nW, N)
            mask = mask.unsqueeze(1) - mask.unsqueeze(2)
            mask = mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))
            attn = attn.view(B, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, H, N, N)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout,
                         training=self.training)
        o = attn.matmul(v).transpose(1, 2).reshape(B, nW * N, self.attn_dim)
        x = F.dropout(self.proj(o), p=self.dropout, training=self.training)
        x = x.view(B, pH // ws[0], pW // ws[1], ws[0], ws[1], C).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(B, pH, pW, C)
        if sum(shift) > 0:
            x = torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2))
        return x[:, :Hh, :Ww, :].contiguous()


class PartitionAttention(nn.Module):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` with the same numbers, but
    its output width ``attn_dim = num_heads * head_dim`` stored (torchvision reshapes the heads
    back to the input width) and its modules named as the other head attentions: ``qkv``
    (``to_qkv``) and ``proj`` (``merge``). Per-head parameters: the relative position bias
    table's columns. Input and output [B, G, P, dim]."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, max_seq_len: int,
                 scale: float):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = num_heads, head_dim, num_heads * head_dim
        self.max_seq_len, self.scale_factor = max_seq_len, scale
        self.qkv = nn.Linear(dim, 3 * self.attn_dim)
        self.proj = nn.Linear(self.attn_dim, dim)
        self.norm, self.gate = nn.Identity(), None

    @classmethod
    def from_torchvision(cls, m: nn.Module) -> "PartitionAttention":
        import copy
        new = cls(m.to_qkv.in_features, m.n_heads, m.head_dim, m.max_seq_len, m.scale_factor)
        new.qkv, new.proj = copy.deepcopy(m.to_qkv), copy.deepcopy(m.merge)
        new.relative_position_bias_table = copy.deepcopy(m.relative_position_bias_table)
        new.register_buffer("relative_position_index", m.relative_position_index.clone())
        new.train(m.training)
        return new

    def head_params(self):
        return [(self, "relative_position_bias_table", 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, G, P, _ = x.shape
        H, DH = self.num_heads, self.head_dim
        q, k, v = (t.reshape(B, G, P, H, DH).permute(0, 1, 3, 2, 4)
                   for t in torch.chunk(self.qkv(x), 3, dim=-1))
        k = k * self.scale_factor          # the unpruned model's 1 / sqrt(input width), fixed
        dot = torch.einsum("B G H I D, B G H J D -> B G H I J", q, k)
        dot = F.softmax(dot + _relative_bias(self.relative_position_bias_table,
                                             self.relative_position_index, self.max_seq_len),
                        dim=-1)
        out = torch.einsum("B G H I J, B G H J D -> B G H I D", dot, v)
        return self.proj(out.permute(0, 1, 3, 2, 4).reshape(B, G, P, self.attn_dim))


_TV_MAXVIT = "torchvision.models.maxvit"


_TV_SWIN = "torchvision.models.swin_transformer"


def _tv_window_attention(parent: nn.Module, attr: str, m: nn.Module) -> bool:
    return (attr == "attn" and type(m).__module__ == _TV_SWIN
            and type(m).__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")
            and type(parent).__name__ in ("SwinTransformerBlock", "SwinTransformerBlockV2")
            and m.qkv.in_features % m.num_heads == 0 and m.qkv.in_features == m.proj.out_features)


def _tv_partition_attention(m: nn.Module) -> bool:
    return (type(m).__module__ == _TV_MAXVIT
            and type(m).__name__ == "RelativePositionalMultiHeadAttention")


def kept_residual(model: nn.Module) -> List[nn.Module]:
    """The producers of a torchvision Swin's or MaxViT's residual width (patch embedding or
    stem, every attention, MLP and conv block output, every patch merging) and V2 Swin's
    position-bias MLPs: kept whole. Torch-Pruning's search through the window partitions runs
    for hours (the width is shared by a whole stage and reshaped in every block); heads, MLP
    neurons and inner conv channels are pruned."""
    out: List[nn.Module] = []

    def last_linear(m: nn.Module) -> List[nn.Module]:
        return [c for c in m.modules() if isinstance(c, nn.Linear)][-1:]
    for m in model.modules():
        where, name = type(m).__module__, type(m).__name__
        if isinstance(m, WindowAttention):
            out.append(m.proj)
            if m.cosine:
                out.extend(c for c in m.cpb_mlp.modules() if isinstance(c, nn.Linear))
        elif where == _TV_SWIN and name == "SwinTransformer":
            out.extend([c for c in m.features[0].modules() if isinstance(c, nn.Conv2d)][:1])
        elif where == _TV_SWIN and name in ("SwinTransformerBlock", "SwinTransformerBlockV2"):
            out.extend(last_linear(m.mlp))
        elif where == _TV_SWIN and name in ("PatchMerging", "PatchMergingV2"):
            out.append(m.reduction)
        elif isinstance(m, (_TimmWindowHeads, _TimmWindowV2Heads)):       # timm Swin (V2)
            out.append(m.proj)
            if hasattr(m, "cpb_mlp"):
                out.extend(c for c in m.cpb_mlp.modules() if isinstance(c, nn.Linear))
        elif where in (_TIMM_SWIN, _TIMM_SWIN_V2):
            if name in ("SwinTransformer", "SwinTransformerV2"):
                out.extend([c for c in m.patch_embed.modules() if isinstance(c, nn.Conv2d)][:1])
            elif name in ("SwinTransformerBlock", "SwinTransformerV2Block"):
                out.extend(last_linear(m.mlp))
            elif name == "PatchMerging":
                out.append(m.reduction)
        elif isinstance(m, _TimmMaxxHeads):
            out.append(m.proj)
            if m.rel_pos is not None and hasattr(m.rel_pos, "mlp"):
                out.extend(c for c in m.rel_pos.mlp.modules() if isinstance(c, nn.Linear))
        elif where == _TIMM_MAXXVIT and name == "TransformerBlock2d":      # CoAtNet
            out.extend([c for c in m.mlp.modules() if isinstance(c, nn.Conv2d)][-1:])
            for part in (m.shortcut, m.norm1):
                out.extend(c for c in part.modules() if isinstance(c, nn.Conv2d))
        elif where == _TIMM_MAXXVIT and name == "MaxxVit":
            out.extend([c for c in m.stem.modules() if isinstance(c, nn.Conv2d)][-1:])
        elif where == _TIMM_MAXXVIT and name == "MbConvBlock":
            out.append(m.conv3_1x1)
            out.extend(c for c in m.shortcut.modules() if isinstance(c, nn.Conv2d))
        elif where == _TIMM_MAXXVIT and name == "PartitionAttentionCl":
            out.extend(last_linear(m.mlp))
        elif where == _TV_MAXVIT and name == "MaxVit":
            out.extend([c for c in m.stem.modules() if isinstance(c, nn.Conv2d)][-1:])
        elif where == _TV_MAXVIT and name == "MBConv":
            out.append(m.layers.conv_c)
            out.extend(c for c in m.proj.modules() if isinstance(c, nn.Conv2d))
        elif where == _TV_MAXVIT and name == "PartitionAttentionLayer":
            out.extend(c.proj for c in m.attn_layer.modules() if isinstance(c, PartitionAttention))
            out.extend(last_linear(m.mlp_layer))
    return out


class _ChannelShuffle(torch.autograd.Function):
    """torchvision's ``channel_shuffle(x, groups)`` as one autograd node: Torch-Pruning cannot
    map channels through its view / transpose / view (its trace divides by zero), and sees this
    node as an element-wise op instead. Only groups that never pass through it are pruned
    (:func:`shuffle_outputs` keeps the others whole); the self-check verifies that."""

    @staticmethod
    def forward(ctx, x, groups: int):
        ctx.groups = groups
        return _shuffle(x, groups)

    @staticmethod
    def backward(ctx, g):
        return _shuffle(g, g.shape[1] // ctx.groups), None     # the inverse permutation


def _shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c = x.shape[:2]
    return x.reshape(b, groups, c // groups, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


_SHUFFLE_CLASS = None


def _shuffle_block_class():
    """``ShuffleResidual``: torchvision's ShuffleNetV2 ``InvertedResidual`` with the same
    forward, its channel shuffle one :class:`_ChannelShuffle` node (made on first use:
    torchvision is optional; ``fair_pruner.graph.ShuffleResidual`` resolves it, so a pruned
    model pickles)."""
    global _SHUFFLE_CLASS
    if _SHUFFLE_CLASS is None:
        from torchvision.models.shufflenetv2 import InvertedResidual

        class ShuffleResidual(InvertedResidual):
            def forward(self, x):
                if self.stride == 1:
                    x1, x2 = x.chunk(2, dim=1)
                    out = torch.cat((x1, self.branch2(x2)), dim=1)
                else:
                    out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
                return _ChannelShuffle.apply(out, 2)
        ShuffleResidual.__module__, ShuffleResidual.__qualname__ = __name__, "ShuffleResidual"
        _SHUFFLE_CLASS = ShuffleResidual
    return _SHUFFLE_CLASS


# timm attention fair_pruner prunes by head after a class swap (same module, same weights): a
# subclass of timm's class with the mixin below holding what the head machinery reads.
_TIMM_SWIN = "timm.models.swin_transformer"
_TIMM_SWIN_V2 = "timm.models.swin_transformer_v2"
_TIMM_MAXXVIT = "timm.models.maxxvit"
_TIMM_EFFICIENTFORMER = "timm.models.efficientformer"
_TIMM_EVA = "timm.models.eva"
_TIMM_ATTENTION_MODULE = "timm.layers.attention"
# timm's relative position biases: the per-head parameters ((module path, attribute, dim)
# below the rel_pos module)
_TIMM_REL_POS = {"RelPosBias": (("", "relative_position_bias_table", 1),),
                 "RelPosBiasTf": (("", "relative_position_bias_table", 0),),
                 "RelPosMlp": (("mlp.fc2", "weight", 0), ("mlp.fc2", "bias", 0))}


class _TimmHeads:
    """Base of the class-swapped timm attentions. The attributes :func:`head_attention` reads
    (``head_dim``, ``attn_dim``, no ``norm`` / ``gate``) are set by :func:`_swap_timm`;
    ``added_attrs`` are those timm's class does not have (removed again by
    :func:`restore_timm_classes`)."""
    added_attrs = ("head_dim", "attn_dim", "gate", "norm")


class _TimmWindowHeads(_TimmHeads):
    """timm Swin's ``WindowAttention`` (V1): its forward reads the head count from
    ``num_heads`` and the head width from ``qkv``'s rows, so only its per-head parameter is
    added: the relative position bias table's columns."""

    def head_params(self):
        return [(self, "relative_position_bias_table", 1)]


class _TimmQVBiasHeads(_TimmHeads):
    """A timm attention with ``q_bias`` / ``v_bias`` parameters beside a bias-free fused
    ``qkv`` and a zero ``k_bias`` buffer (Swin-V2, EVA): the head's slices of q_bias / v_bias
    are per-head parameters, k_bias is remade at the new width, and the forward adds the three
    after calling ``qkv`` as a module (timm's ``F.linear`` on its weight hides it from hooks and
    MAC counts)."""

    def qv_bias_params(self):
        if self.q_bias is None:
            return []
        return [(self, "q_bias", 0, "features"), (self, "v_bias", 0, "features")]

    def heads_pruned(self) -> None:
        if self.q_bias is not None:
            self.register_buffer("k_bias", torch.zeros_like(self.q_bias.detach()),
                                 persistent=False)

    def biased_qkv(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)
        if self.q_bias is not None:
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        return qkv


class _TimmWindowV2Heads(_TimmQVBiasHeads):
    """timm Swin-V2's ``WindowAttention`` with the same numbers, but its head outputs reshaped
    to their own width (timm reshapes them to the input width, which a pruned head count
    breaks) and its q/k/v bias added after ``qkv`` (:class:`_TimmQVBiasHeads`). Per-head
    parameters: ``logit_scale``, the rows of the position-bias MLP's last Linear, and the head's
    slices of ``q_bias`` / ``v_bias``."""

    def head_params(self):
        return [(self, "logit_scale", 0), (self.cpb_mlp[-1], "weight", 0)] + self.qv_bias_params()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B * windows, N, dim], mask [windows, N, N] or None -> [B * windows, N, dim]."""
        B_, N, _ = x.shape
        q, k, v = self.biased_qkv(x).reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp()
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        area = self.window_size[0] * self.window_size[1]
        bias = table[self.relative_position_index.view(-1)].view(area, area, -1)
        attn = attn + 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous()).unsqueeze(0)
        if mask is not None:
            num_win = mask.shape[0]
            attn = (attn.view(-1, num_win, self.num_heads, N, N)
                    + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.num_heads, N, N)
        attn = self.attn_drop(self.softmax(attn))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(B_, N, -1)))


class _TimmMaxxHeads(_TimmHeads):
    """timm MaxViT's ``AttentionCl`` / CoAtNet's ``Attention2d`` (their forward reads
    ``num_heads`` and ``dim_head``): q/k/v rows head-major where timm lays them out so
    (``head_first``: each head's q, k and v rows together), and the relative position bias's
    per-head parameters, whose stored head count and bias shape follow a pruning."""

    @property
    def qkv_heads_first(self) -> bool:
        return bool(self.head_first)

    def head_params(self):
        if self.rel_pos is None:
            return []
        out = []
        for path, attr, dim in _TIMM_REL_POS[type(self.rel_pos).__name__]:
            owner = self.rel_pos.get_submodule(path) if path else self.rel_pos
            if getattr(owner, attr, None) is not None:
                out.append((owner, attr, dim))
        return out

    def heads_pruned(self) -> None:
        self.dim_head = self.head_dim
        rp = self.rel_pos
        if rp is None:
            return
        if hasattr(rp, "num_heads"):
            rp.num_heads = self.num_heads
        shape = list(rp.bias_shape)
        shape[0 if type(rp).__name__ == "RelPosBiasTf" else -1] = self.num_heads
        rp.bias_shape = tuple(shape)


class _TimmEfficientFormerHeads(_TimmHeads):
    """timm EfficientFormer's ``Attention``: each head's q/k/v rows together (q and k of
    ``key_dim``, v of ``val_dim``, the width a head gives ``proj``), a per-head row of
    ``attention_biases``; its stored widths and eval-mode bias cache follow a pruning."""
    qkv_heads_first = True

    @property
    def qkv_rows_per_head(self) -> int:
        return 2 * self.key_dim + self.val_dim

    def head_params(self):
        return [(self, "attention_biases", 0)]

    def heads_pruned(self) -> None:
        self.key_attn_dim = self.key_dim * self.num_heads
        self.val_attn_dim = self.val_dim * self.num_heads
        self.attention_bias_cache = {}


class _TimmRopeHeads(_TimmHeads):
    """timm's ``AttentionRope`` (the RoPE ViTs) with a fused ``qkv``: timm's forward reads
    ``num_heads``, ``head_dim`` and ``attn_dim`` (all its own attributes), RoPE acts within a
    head; its key/value head count and width follow a pruning (one q head per kv head)."""
    added_attrs = ()

    def heads_pruned(self) -> None:
        self.num_kv_heads, self.kv_dim = self.num_heads, self.attn_dim


class _TimmEvaHeads(_TimmQVBiasHeads):
    """timm EVA's ``EvaAttention`` (EVA-02 and timm's RoPE ViTs) with a fused ``qkv``: the same
    numbers as timm's forward, but the head outputs reshaped to their own width (timm reshapes
    them to the input width) and the q/k/v bias added after ``qkv``
    (:class:`_TimmQVBiasHeads`). RoPE and q/k norms act within a head, the same for every head.
    Per-head parameters: the head's slices of ``q_bias`` / ``v_bias``."""

    def head_params(self):
        return self.qv_bias_params()

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        """x [B, N, dim] (rope [N - prefix tokens, 2 head_dim] or None) -> [B, N, dim]."""
        import importlib
        ev = importlib.import_module(_TIMM_EVA)       # timm's own rope and mask helpers
        B, N, _ = x.shape
        q, k, v = self.biased_qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            npt, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
            q = torch.cat([q[:, :, :npt, :], ev.apply_rot_embed_cat(q[:, :, npt:, :], rope,
                                                                    half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt, :], ev.apply_rot_embed_cat(k[:, :, npt:, :], rope,
                                                                    half=half)], dim=2).type_as(v)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = ev.maybe_add_mask(attn, ev.resolve_self_attn_mask(N, attn, attn_mask,
                                                                     is_causal=is_causal))
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, -1))
        return self.proj_drop(self.proj(x))


# our class name -> (timm module, timm class, mixin)
_TIMM_SWAPS = {
    "TimmWindowAttention": (_TIMM_SWIN, "WindowAttention", _TimmWindowHeads),
    "TimmWindowAttentionV2": (_TIMM_SWIN_V2, "WindowAttention", _TimmWindowV2Heads),
    "TimmAttentionCl": (_TIMM_MAXXVIT, "AttentionCl", _TimmMaxxHeads),
    "TimmAttention2d": (_TIMM_MAXXVIT, "Attention2d", _TimmMaxxHeads),
    "TimmEfficientFormerAttention": (_TIMM_EFFICIENTFORMER, "Attention", _TimmEfficientFormerHeads),
    "TimmEvaAttention": (_TIMM_EVA, "EvaAttention", _TimmEvaHeads),
    "TimmAttentionRope": (_TIMM_ATTENTION_MODULE, "AttentionRope", _TimmRopeHeads),
}
_TIMM_CLASSES: Dict[str, type] = {}


def _timm_class(name: str) -> type:
    """Our subclass ``name`` of the timm class in :data:`_TIMM_SWAPS`, made on first use (timm is
    optional); ``fair_pruner.graph.<name>`` resolves it, so a pruned model pickles."""
    if name not in _TIMM_CLASSES:
        import importlib
        where, base, mixin = _TIMM_SWAPS[name]
        cls = type(name, (mixin, getattr(importlib.import_module(where), base)), {})
        cls.__module__, cls.__qualname__ = __name__, name
        _TIMM_CLASSES[name] = cls
    return _TIMM_CLASSES[name]


def _pointwise(m: Any) -> bool:
    """A Linear, or a Conv2d that is one (1x1 kernel, stride 1, no padding, one group)."""
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid") and m.dilation == (1, 1) and m.groups == 1)


def _width(m: nn.Module, out: bool) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features if out else m.in_features
    return m.out_channels if out else m.in_channels


def _timm_swap(m: nn.Module) -> Optional[str]:
    """The name of our class for timm attention ``m`` whose heads fair_pruner removes exactly
    (q/k/v rows that split evenly into heads, per-head parameters it knows), else None."""
    cls = type(m)
    where, base = cls.__module__, cls.__name__
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    H = getattr(m, "num_heads", 0)
    if where == _TIMM_EFFICIENTFORMER and base == "Attention":
        kd, vd = getattr(m, "key_dim", 0), getattr(m, "val_dim", 0)
        ab = getattr(m, "attention_biases", None)
        ok = (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and H >= 1
              and kd >= 1 and vd >= 1 and qkv.out_features == H * (2 * kd + vd)
              and proj.in_features == H * vd and isinstance(ab, torch.Tensor)
              and ab.shape[0] == H)
        return "TimmEfficientFormerAttention" if ok else None
    if not (isinstance(H, int) and H >= 1 and _pointwise(qkv) and _pointwise(proj)
            and type(qkv) is type(proj) and _width(qkv, True) == 3 * _width(proj, False)
            and _width(qkv, True) % (3 * H) == 0):
        return None
    if where in (_TIMM_SWIN, _TIMM_SWIN_V2) and base == "WindowAttention":
        if not isinstance(qkv, nn.Linear):
            return None
        if where == _TIMM_SWIN:
            table = getattr(m, "relative_position_bias_table", None)
            ok = isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[1] == H
            return "TimmWindowAttention" if ok else None
        mlp, ls = getattr(m, "cpb_mlp", None), getattr(m, "logit_scale", None)
        ok = (qkv.bias is None and isinstance(mlp, nn.Sequential)
              and isinstance(mlp[-1], nn.Linear) and mlp[-1].out_features == H
              and mlp[-1].bias is None and isinstance(ls, torch.Tensor) and ls.shape[0] == H)
        return "TimmWindowAttentionV2" if ok else None
    if where == _TIMM_ATTENTION_MODULE and base == "AttentionRope":
        ok = (isinstance(qkv, nn.Linear) and getattr(m, "q_proj", None) is None
              and getattr(m, "num_kv_heads", 0) == H and getattr(m, "num_kv_groups", 1) == 1
              and isinstance(getattr(m, "norm", None), nn.Identity)
              and getattr(m, "gate", None) is None
              and getattr(m, "head_dim", 0) * H == getattr(m, "attn_dim", -1)
              == _width(proj, False))
        return "TimmAttentionRope" if ok else None
    if where == _TIMM_EVA and base == "EvaAttention":
        biases = [getattr(m, a, None) for a in ("q_bias", "k_bias", "v_bias")]
        A = _width(proj, False)
        ok = (isinstance(qkv, nn.Linear) and qkv.bias is None
              and isinstance(getattr(m, "norm", None), nn.Identity)
              and getattr(m, "gate", None) is None and getattr(m, "head_dim", 0) * H == A
              and (all(b is None for b in biases) or all(
                  isinstance(b, torch.Tensor) and b.shape == (A,) for b in biases)))
        return "TimmEvaAttention" if ok else None
    if where == _TIMM_MAXXVIT and base in ("AttentionCl", "Attention2d"):
        rp = getattr(m, "rel_pos", None)
        layer = nn.Linear if base == "AttentionCl" else nn.Conv2d
        ok = (isinstance(qkv, layer) and _width(qkv, True) == 3 * H * getattr(m, "dim_head", 0)
              and (rp is None or type(rp).__name__ in _TIMM_REL_POS)
              and getattr(rp, "prefix_tokens", 0) == 0)
        return f"Timm{base}" if ok else None
    return None


def restore_timm_classes(model: nn.Module) -> nn.Module:
    """Give every class-swapped timm attention of ``model`` its timm class back where timm's
    own forward serves the pruned heads (Swin V1, MaxViT, CoAtNet, EfficientFormer: they read
    ``num_heads`` and the widths heads_pruned updates), so
    that a pruned model pickles and loads with timm alone; Swin-V2 keeps
    ``TimmWindowAttentionV2`` (timm's forward assumes the full width). In place; returns
    ``model``."""
    for m in model.modules():
        # (mixin, timm class) are the bases (_timm_class); timm's forward serves the pruned
        # heads unless the mixin replaces it
        if isinstance(m, _TimmHeads) and "forward" not in type(m).__bases__[0].__dict__:
            added = type(m).added_attrs
            m.__class__ = type(m).__bases__[1]
            for attr in added:
                m.__dict__.pop(attr, None)
                m._modules.pop(attr, None)
    return model


def _swap_timm(m: nn.Module, name: str) -> None:
    m.__class__ = _timm_class(name)
    m.head_dim = _width(m.proj, False) // m.num_heads      # what one head gives proj
    m.attn_dim = m.num_heads * m.head_dim
    m.norm, m.gate = nn.Identity(), None


def __getattr__(name: str):
    if name == "ShuffleResidual":
        return _shuffle_block_class()
    if name in _TIMM_SWAPS:
        return _timm_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tv_shuffle_block(m: nn.Module) -> bool:
    cls = type(m)
    return (cls.__module__ == "torchvision.models.shufflenetv2"
            and cls.__name__ == "InvertedResidual")


def _replacement(parent: nn.Module, attr: str, m: nn.Module):
    """The function that builds the equivalent block of child ``attr`` of ``parent``, or None."""
    if _convertible(parent, attr, m):
        return SelfAttention.from_multihead
    if _tv_window_attention(parent, attr, m):
        return WindowAttention.from_torchvision
    if _tv_partition_attention(m):
        return PartitionAttention.from_torchvision
    return None


def needs_conversion(model: nn.Module) -> bool:
    """Whether :func:`convert_blocks` would change ``model``."""
    return any(_tv_shuffle_block(m) or _timm_swap(m) for m in model.modules()) or any(
        _replacement(parent, attr, m) is not None
        for parent in model.modules() for attr, m in parent.named_children())


def convert_blocks(model: nn.Module) -> nn.Module:
    """Make, in place, the blocks fair_pruner prunes through a rewrite: every self-attention
    nn.MultiheadAttention whose call pattern is known (:func:`_convertible`) becomes the
    equivalent :class:`SelfAttention` (same name, so a score book's groups read ``<name>.qkv``
    / ``<name>.proj``), torchvision's Swin and MaxViT attention :class:`WindowAttention` /
    :class:`PartitionAttention`, and every torchvision ShuffleNetV2 block a ``ShuffleResidual``
    (same modules and forward). Returns ``model``. Scoring, pruning and masking all see the converted
    model; a pruned model keeps the converted blocks."""
    for parent in list(model.modules()):
        for attr, m in list(parent.named_children()):
            make = _replacement(parent, attr, m)
            if make is not None:
                setattr(parent, attr, make(m))
    for m in model.modules():
        if _tv_shuffle_block(m):
            m.__class__ = _shuffle_block_class()
        elif (swap := _timm_swap(m)) is not None:
            _swap_timm(m, swap)
    return model


def shuffle_outputs(model: nn.Module) -> List[nn.Module]:
    """The convs whose channels a channel shuffle interleaves (the last conv of each branch of
    every ``ShuffleResidual``, and branch1's depthwise conv on the block input): the groups
    they belong to run through shuffles block after block, so they are kept whole; each
    branch2's inner channels and the last conv are pruned."""
    out = []
    for m in model.modules():
        if type(m) is _SHUFFLE_CLASS:
            first = [c for c in m.branch1.modules() if isinstance(c, nn.Conv2d)]
            # branch1's depthwise conv carries the block's input channels (a shuffled group;
            # Torch-Pruning's search fails through the shuffle node and a split after it)
            out.extend(first[-1:] + first[:1])
            out.extend([c for c in m.branch2.modules() if isinstance(c, nn.Conv2d)][-1:])
    return out


def refresh_sizes(model: nn.Module) -> None:
    """Update widths a model stores besides its parameters after its channels were pruned:
    torchvision's VisionTransformer reshapes its patch embedding with ``hidden_dim``."""
    for m in model.modules():
        cls = type(m)
        if (cls.__module__ == "torchvision.models.vision_transformer"
                and cls.__name__ == "VisionTransformer" and isinstance(m.conv_proj, nn.Conv2d)):
            m.hidden_dim = m.conv_proj.out_channels


# Where timm defines the ViT attention (timm.layers since 1.0; vision_transformer before).
_TIMM_ATTENTION = ("timm.layers.attention", "timm.models.vision_transformer")


def head_attention(m: nn.Module) -> bool:
    """A multi-head attention whose heads fair_pruner removes exactly: timm's ViT / DeiT
    ``Attention`` (``timm.layers.Attention``), the converted torchvision blocks
    (:class:`SelfAttention`, :class:`WindowAttention`, :class:`PartitionAttention`) and the
    class-swapped timm ones (:data:`_TIMM_SWAPS`: Swin, Swin-V2, MaxViT, CoAtNet,
    EfficientFormer). All share a pointwise (Linear or 1x1 conv) ``qkv`` of
    :func:`qkv_rows_per_head` rows per head, laid out (q|k|v, head, head_dim) or head-major
    (``qkv_heads_first``), a ``proj`` [dim, attn_dim] and ``num_heads`` / ``attn_dim`` read in
    the forward; timm's options that mix heads (a norm over
    all heads' outputs, ``scale_norm``) or add producers (``gated``) are excluded. A unit is one
    head: its q/k/v rows, its proj input columns and its entries of any per-head parameter
    (``head_params()``)."""
    cls = type(m)
    if not (isinstance(m, (SelfAttention, WindowAttention, PartitionAttention))
            or isinstance(m, _TimmHeads)
            or (cls.__module__ in _TIMM_ATTENTION and cls.__name__ == "Attention")):
        return False
    qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
    H, hd = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    return (_pointwise(qkv) and _pointwise(proj) and type(qkv) is type(proj)
            and isinstance(H, int) and isinstance(hd, int) and H >= 1
            and getattr(m, "attn_dim", None) == H * hd
            and _width(qkv, True) == H * qkv_rows_per_head(m) and _width(proj, False) == H * hd
            and (qkv_rows_per_head(m) == 3 * hd or getattr(m, "qkv_heads_first", False))
            and isinstance(getattr(m, "norm", None), nn.Identity)
            and getattr(m, "gate", "absent") is None)


def qkv_rows_per_head(m: nn.Module) -> int:
    """q/k/v rows of one head of ``m`` (:func:`head_attention`): 3 * head_dim, or what the
    attention says where q / k are narrower than v (EfficientFormer: 2 * key_dim + val_dim)."""
    return int(getattr(m, "qkv_rows_per_head", 3 * m.head_dim))


def head_spec(name: str, m: nn.Module) -> GroupSpec:
    """The group of ``m``'s heads (:func:`head_attention`): unit h is qkv rows
    {s * attn_dim + h * head_dim + d} (s = q, k, v; or {h * R + j}, R = qkv_rows_per_head, where
    the rows are head-major, ``qkv_heads_first``) and proj input columns {h * head_dim + d}."""
    H, hd = m.num_heads, m.head_dim
    A = H * hd
    R = qkv_rows_per_head(m)
    head_of = ((lambda c: c // R) if getattr(m, "qkv_heads_first", False)
               else (lambda c: (c % A) // hd))
    return GroupSpec(name=name, size=H, root=name, members=[
        Member(f"{name}.qkv", "producer", list(range(H * R)),
               [head_of(c) for c in range(H * R)]),
        Member(f"{name}.proj", "consumer", list(range(A)), [c // hd for c in range(A)])])


def head_tensors(m: nn.Module) -> List[tuple]:
    """(module, attribute, dim, layout) of every parameter of ``m`` (:func:`head_attention`)
    indexed by head: layout "qkv" (q|k|v sections of heads x head_dim, or head-major:
    :func:`qkv_rows_per_head` rows per head), "features" (heads x head_dim) or "heads" (one
    entry per head); ``head_params()`` adds
    (owner, attribute, dim) in the "heads" layout, or (owner, attribute, dim, layout)."""
    out = [(m.qkv, "weight", 0, "qkv"), (m.qkv, "bias", 0, "qkv"),
           (m.proj, "weight", 1, "features")]
    for t in (m.head_params() if hasattr(m, "head_params") else ()):
        out.append(tuple(t) if len(t) == 4 else (*t, "heads"))    # (owner, attr, dim[, layout])
    return [t for t in out if getattr(t[0], t[1]) is not None]


def prune_heads(m: nn.Module, idxs: Sequence[int]) -> None:
    """Remove heads ``idxs`` of ``m`` (:func:`head_attention`) in place."""
    gone = set(int(i) for i in idxs)
    H, hd = m.num_heads, m.head_dim
    A = H * hd
    keep = [h for h in range(H) if h not in gone]
    cols = torch.tensor([h * hd + d for h in keep for d in range(hd)], dtype=torch.long)
    R = qkv_rows_per_head(m)
    rows = (torch.tensor([h * R + j for h in keep for j in range(R)], dtype=torch.long)
            if getattr(m, "qkv_heads_first", False)
            else torch.cat([cols + s * A for s in range(3)]))
    idx = {"qkv": rows, "features": cols, "heads": torch.tensor(keep, dtype=torch.long)}
    for owner, attr, dim, layout in head_tensors(m):
        p = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(
            p.detach().index_select(dim, idx[layout].to(p.device)).clone(),
            requires_grad=p.requires_grad))
        if isinstance(owner, nn.Linear) and attr == "weight":
            setattr(owner, "out_features" if dim == 0 else "in_features", idx[layout].numel())
        elif isinstance(owner, nn.Conv2d) and attr == "weight":
            setattr(owner, "out_channels" if dim == 0 else "in_channels", idx[layout].numel())
    m.num_heads, m.attn_dim = len(keep), len(keep) * hd
    if hasattr(m, "heads_pruned"):       # sizes the module stores besides num_heads
        m.heads_pruned()


_TIMM_MLP = "timm.layers.mlp"


def glu_mlp(m: nn.Module) -> bool:
    """timm's ``GluMlp`` (EVA-02's SwiGLU, GeGLU): one pointwise ``fc1`` whose output halves
    gate each other (``act(x1) * x2``, or ``x1 * act(x2)`` with ``gate_last``), no norm between
    them and ``fc2``. Its unit j is fc1 rows j and j + H and fc2 input j (H = fc2's input
    width); Torch-Pruning maps the halves onto fc2 wrongly, so these groups are built here."""
    cls = type(m)
    if not (cls.__module__ == _TIMM_MLP and cls.__name__ == "GluMlp"):
        return False
    fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
    return (_pointwise(fc1) and _pointwise(fc2) and type(fc1) is type(fc2)
            and _width(fc1, True) == 2 * _width(fc2, False) >= 2
            and isinstance(getattr(m, "norm", None), nn.Identity)
            and getattr(m, "chunk_dim", None) == (1 if isinstance(fc1, nn.Conv2d) else -1))


def glus_by_fc1(model: nn.Module) -> Dict[nn.Module, nn.Module]:
    """fc1 -> its GluMlp (:func:`glu_mlp`) for every GluMlp of ``model``: a
    :func:`glu_spec` group's root is its fc1."""
    return {m.fc1: m for m in model.modules() if glu_mlp(m)}


def glu_spec(name: str, m: nn.Module) -> GroupSpec:
    """The group of GluMlp ``m``'s units (:func:`glu_mlp`), rooted at its fc1: two channels per
    unit (``interleave`` 2: unit j is fc1 channels j and j + H)."""
    H = _width(m.fc2, False)
    root = f"{name}.fc1"
    return GroupSpec(name=root, size=H, root=root, interleave=2, members=[
        Member(root, "producer", list(range(2 * H)), [c % H for c in range(2 * H)]),
        Member(f"{name}.fc2", "consumer", list(range(H)), list(range(H)))])


def glu_tensors(m: nn.Module) -> List[tuple]:
    """(module, attribute, dim, channels per unit) of every parameter of GluMlp ``m`` indexed
    by its units."""
    out = [(m.fc1, "weight", 0, 2), (m.fc1, "bias", 0, 2), (m.fc2, "weight", 1, 1)]
    return [t for t in out if getattr(t[0], t[1]) is not None]


def prune_glu(m: nn.Module, idxs: Sequence[int]) -> None:
    """Remove units ``idxs`` of GluMlp ``m`` (:func:`glu_mlp`) in place."""
    H = _width(m.fc2, False)
    gone = set(int(i) for i in idxs)
    keep = torch.tensor([j for j in range(H) if j not in gone], dtype=torch.long)
    idx = {2: torch.cat([keep, keep + H]), 1: keep}
    for owner, attr, dim, per_unit in glu_tensors(m):
        t = getattr(owner, attr)
        setattr(owner, attr, nn.Parameter(
            t.detach().index_select(dim, idx[per_unit].to(t.device)).clone(),
            requires_grad=t.requires_grad))
    if isinstance(m.fc1, nn.Linear):
        m.fc1.out_features, m.fc2.in_features = 2 * keep.numel(), keep.numel()
    else:
        m.fc1.out_channels, m.fc2.in_channels = 2 * keep.numel(), keep.numel()


def check_model_types(model: nn.Module) -> None:
    """Refuse, before tracing, the layers Torch-Pruning's graph mishandles outright: recurrent
    layers (its LSTM pruner does not cost the gates exactly; GRU / RNN raise deep inside it)."""
    bad = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.RNNBase)]
    if bad:
        shown = ", ".join(f"{n or '<model>'} ({type(m).__name__})" for n, m in bad[:5])
        raise UnsupportedModelError(
            f"recurrent layers cannot be pruned exactly yet: {shown}. fair_pruner prunes "
            "Conv/Linear networks (and Hugging Face causal LMs through fp.score on the LM); "
            "score a model without nn.LSTM / nn.GRU / nn.RNN layers")
    windows = [(n, m) for n, m in model.named_modules()
               if type(m).__name__ in WINDOW_ATTENTION and type(m).__module__.startswith(
                   ("torchvision.", "timm."))
               and not head_attention(getattr(m, "attn", None))]  # timm MaxViT, converted
    if windows:
        n, m = windows[0]
        raise UnsupportedModelError(
            f"{len(windows)} window-attention layers, e.g. {n} ({type(m).__module__}."
            f"{type(m).__name__}): their head count is fixed in the module and their window "
            "reshapes make Torch-Pruning's dependency search run for hours, so this window "
            "attention is not pruned yet (torchvision's Swin / Swin-V2 / MaxViT and timm's "
            "Swin / Swin-V2 / MaxViT are; so are the heads of torchvision's ViT and timm's "
            "ViT / DeiT)")


def _call(model: nn.Module, inputs: Any) -> Any:
    """``model`` on ``inputs`` as the engine calls it (a dict: keywords, a tuple: arguments)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _torch_pruning():
    """``import torch_pruning``, without letting it import timm (and through timm, torchvision)
    when timm is not imported yet: only its FLOP counter (``tp.utils.count_ops``, unused here)
    reads timm, and the import cost 1.5-1.9 s of a 2.9 s first ``fp.score`` call. A timm model
    means timm is already imported, and Torch-Pruning then sees it as usual."""
    import sys
    if "torch_pruning" in sys.modules or "timm" in sys.modules:
        import torch_pruning
        return torch_pruning
    sys.modules["timm"] = None          # makes `import timm` raise ImportError, for this import
    try:
        import torch_pruning
    finally:
        if sys.modules.get("timm", 0) is None:
            del sys.modules["timm"]
    return torch_pruning


def build_dependency_graph(model: nn.Module, example_inputs: Any):
    """Torch-Pruning DependencyGraph of ``model`` traced on ``example_inputs``.

    Tracing follows autograd, so frozen parameters are made trainable for the trace and their
    flags restored before returning (the model ends exactly as it was).
    """
    tp = _torch_pruning()

    frozen = [p for p in model.parameters() if not p.requires_grad]
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for p in frozen:
                p.requires_grad_(True)
            # forward_fn: Torch-Pruning would call model(*x) first, unbatching a 1-sample x.
            # It reads the graph's structure only (next_functions, saved dims and sizes).
            with structure_only():
                return tp.DependencyGraph().build_dependency(
                    model, example_inputs=example_inputs, forward_fn=_call, verbose=False)
        except Exception as exc:
            raise UnsupportedModelError(
                f"Torch-Pruning could not trace this model ({type(exc).__name__}: {exc}). "
                "Make sure the model runs on the calibration inputs, or pass the offending "
                "modules in `ignore=`.") from exc
        finally:
            for p in frozen:
                p.requires_grad_(False)


def _role(DG, module, handler) -> Optional[str]:
    out = DG.is_out_channel_pruning_fn(handler)
    if isinstance(module, PRODUCER_TYPES):
        return "producer" if out else "consumer"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) and out:
        return "norm"
    return None


def _grouped_conv(m: nn.Module) -> bool:
    """A grouped, not depthwise, convolution: removing one channel of it would break the equal
    fan-in / fan-out of its channel groups, so a group touching one removes interleaved units
    (:func:`_interleave`)."""
    return isinstance(m, CONV_TYPES) and 1 < m.groups and not (
        m.groups == m.in_channels == m.out_channels)


def _interleave(DG, g) -> Optional[int]:
    """Channels per unit for a Torch-Pruning group ``g``: 1 without grouped convolutions;
    else the lcm ``L`` of their group counts, unit j being root channels {j + k*C/L : k < L}
    (the same position in every channel group, which Torch-Pruning's grouped-conv pruners
    assume). None when that layout does not hold in some grouped conv (the group is then kept
    whole and reported in ``book.meta["skipped_groups"]``)."""
    gconvs = [it for it in g.items if _grouped_conv(it.dep.target.module)]
    if not gconvs:
        return 1
    L = math.lcm(*(it.dep.target.module.groups for it in gconvs))
    C = len(g[0].idxs)
    if C % L or C // L < 2:
        return None
    n = C // L
    for it in gconvs:
        m = it.dep.target.module
        width = m.out_channels if DG.is_out_channel_pruning_fn(it.dep.handler) else m.in_channels
        shift = width // m.groups
        units: Dict[int, set] = {}
        for i, r in zip(item_idxs(it.idxs), item_idxs(it.root_idxs)):
            units.setdefault(r % n, set()).add(i)
        for chans in units.values():
            if {(i + shift) % width for i in chans} != chans:
                return None
    return L


def item_idxs(idxs) -> List[int]:
    """Torch-Pruning's index lists (ints or _HybridIndex) as ints."""
    return [int(i) for i in idxs]


def group_name(root: str, producers: Sequence[str]) -> str:
    """The name of a group: its root module's, with ``+N`` appended when N other modules'
    outputs carry the same units (a residual stream: ``layer4.0.downsample.0+2`` is that conv,
    ``layer4.0.conv2`` and ``layer4.1.conv2``; a depthwise conv after its pointwise one), so a
    plan says which rows cover several layers. A group of one producer keeps the module's name.
    ``Group.modules`` / ``GroupSpec.producers`` list the members."""
    others = len({p for p in producers if p != root})
    return f"{root}+{others}" if others else root


def check_traced(model: nn.Module, DG, ran: Sequence[nn.Module]) -> None:
    """Refuse Conv/Linear layers that ran in the forward but that Torch-Pruning's trace (from
    the outputs back) never reached: a dead branch, whose input channels surgery would not
    follow (the pruned model would fail)."""
    names = {m: n for n, m in model.named_modules()}
    dead = [names.get(m, type(m).__name__) for m in ran if m not in DG.module2node]
    if dead:
        raise UnsupportedModelError(
            f"{dead[:6]} run in the model's forward but the model's outputs do not depend on "
            "them (a dead branch, e.g. an auxiliary head whose result is dropped): pruning could "
            "not follow their inputs. Return their outputs, or skip them in forward when not "
            "training")


def _tied_modules(model: nn.Module) -> Dict[nn.Module, List[str]]:
    """Modules holding a parameter that another module holds too -> the names of all holders."""
    holders: Dict[int, List[tuple]] = {}
    for mn, m in model.named_modules():
        for p in m.parameters(recurse=False):
            holders.setdefault(id(p), []).append((mn or "<model>", m))
    out: Dict[nn.Module, List[str]] = {}
    for hs in holders.values():
        if len({id(m) for _, m in hs}) > 1:
            for _, m in hs:
                out.setdefault(m, []).extend(n for n, _ in hs)
    return out


def _refusal(m: nn.Module, name: str, tied, calls) -> Optional[str]:
    """Why a module touched by a pruning group cannot be pruned exactly (None: it can)."""
    if isinstance(m, nn.MultiheadAttention):
        return (f"{name} (nn.MultiheadAttention): pruning would change its embedding width, "
                f"which it cannot follow; {VIT_HINT}")
    if isinstance(m, nn.RNNBase):
        return f"{name} ({type(m).__name__}): recurrent layers cannot be pruned exactly yet"
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return (f"{name} ({type(m).__name__}): transposed convolutions are not costed or "
                "masked exactly yet")
    if isinstance(m, nn.GroupNorm):
        return (f"{name} (nn.GroupNorm): it normalises across the channels of a group, so "
                "removing a channel changes the others")
    if m in tied:
        return (f"{name} shares a parameter with {sorted(set(tied[m]) - {name})}: pruning would "
                "untie them (untie with nn.Parameter(w.clone()) or keep them whole)")
    if calls.get(m, 0) > 1 and isinstance(m, PRODUCER_TYPES):
        return (f"{name} runs {calls[m]} times per forward: its R-Score would keep one call's "
                "Taylor term only (use separate modules per call, or keep it whole)")
    if isinstance(m, nn.Parameter) or isinstance(m, EXACT_TYPES):
        return None
    if type(m).__module__.startswith("torch_pruning"):     # traced ops: cat, split, add, ...
        return None
    return (f"{name} ({type(m).__name__}) has a pruner fair_pruner does not cost and mask "
            "exactly")


# What Torch-Pruning's group search may take before scoring gives up with a clear error: Swin's
# window reshapes made it run for hours and past 8 GB. Seconds (FAIR_PRUNER_GROUP_SEARCH_S), and
# growth of the process's resident memory in MiB (FAIR_PRUNER_GROUP_SEARCH_MIB; default: half of
# the memory available when the search starts), so that a hang or an out-of-memory kill becomes
# an error naming the way out.
GROUP_SEARCH_LIMIT_S = 300.0
_TICK_S = 0.1


class _SearchLimit(BaseException):     # as KeyboardInterrupt: no `except Exception` inside
    pass                                 # Torch-Pruning may swallow it


def _rss_bytes() -> Optional[int]:
    """This process's resident set size (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return None


def search_memory_limit() -> Optional[int]:
    """Bytes the group search may add to the resident set (None: unbounded / unknown)."""
    if os.environ.get("FAIR_PRUNER_GROUP_SEARCH_MIB", "").strip():
        mib = env_float("FAIR_PRUNER_GROUP_SEARCH_MIB", 0.0)
        return int(mib * (1 << 20)) if mib > 0 else None
    avail = _available_bytes()
    return avail // 2 if avail else None


@contextlib.contextmanager
def search_limits(seconds: Optional[float], what: str, memory: Optional[int] = None):
    """Raise :class:`UnsupportedModelError` when the block runs longer than ``seconds`` or
    grows the resident set by more than ``memory`` bytes (checked every 0.1 s by SIGALRM: main
    thread on POSIX only; elsewhere, or under someone else's alarm, the block runs unbounded)."""
    seconds = seconds if seconds is not None and seconds > 0 else None
    base = _rss_bytes() if memory else None
    memory = memory if base is not None else None
    if ((seconds is None and memory is None) or not hasattr(signal, "setitimer")
            or threading.current_thread() is not threading.main_thread()
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):    # someone else's alarm
        yield
        return
    deadline = time.monotonic() + seconds if seconds is not None else None
    why: List[str] = []

    def handler(signum, frame):
        if deadline is not None and time.monotonic() >= deadline:
            why.append(f"did not finish in {seconds:g} s")
            raise _SearchLimit()
        if memory is not None:
            grown = (_rss_bytes() or base) - base
            if grown > memory:
                why.append(f"grew this process by {grown >> 20:,} MiB, past its limit of "
                           f"{memory >> 20:,} MiB")
                raise _SearchLimit()
    old = signal.signal(signal.SIGALRM, handler)
    tick = min(_TICK_S, seconds) if seconds is not None else _TICK_S
    signal.setitimer(signal.ITIMER_REAL, tick, tick)
    try:
        yield
    except _SearchLimit:
        raise UnsupportedModelError(
            f"{what} {why[-1]}: Torch-Pruning's dependency search explodes on this model "
            "(reshape / permute / window ops, as in Swin or MaxViT). Keep the blocks involved "
            "whole with ignore=[...], or raise the limits with FAIR_PRUNER_GROUP_SEARCH_S="
            "<seconds> / FAIR_PRUNER_GROUP_SEARCH_MIB=<MiB>") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def find_groups(model: nn.Module, DG, ignored: Sequence[nn.Module],
                skipped: Optional[List[str]] = None,
                calls: Optional[Dict[nn.Module, int]] = None,
                tp_groups: Optional[Dict[str, Any]] = None) -> List[GroupSpec]:
    """All prunable coupled groups, in module order (of their roots), excluding groups touching
    ``ignored``. Names: :func:`group_name` (unique: a module is the root of one group at most).

    Groups that touch a grouped (non-depthwise) convolution are left out and their root names
    appended to ``skipped``. A group that touches a module fair_pruner cannot prune exactly
    (:func:`_refusal`: attention, recurrent and transposed-conv layers, GroupNorm, parameters
    shared between modules, a producer run more than once per forward, as counted in
    ``calls``) raises :class:`UnsupportedModelError` naming the modules and the ``ignore=``
    that keeps those groups whole, as does a search past its limits (:func:`search_limits`).
    ``tp_groups`` (if given) receives each spec's Torch-Pruning group, by spec name, for
    :func:`build_cost_model` (the search is the expensive part: done once).
    """
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    pnames = {p: n for n, p in model.named_parameters()}
    inside_mha = {sub: n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for sub in m.modules() if sub is not m}
    tied, calls = _tied_modules(model), calls or {}
    specs, refused = [], []
    ignored_set = set(ignored)
    heads = {n: m for n, m in model.named_modules() if head_attention(m)}
    # Their qkv rows are one head's units, not channels: Torch-Pruning's qkv group is replaced
    # by a head group (head_spec; none where the attention or its qkv is ignored), and not
    # searched (its reshapes into heads are costly to follow); the residual stream and MLP
    # groups stay as traced.
    own_roots = {m.qkv for m in heads.values()}
    heads = {n: m for n, m in heads.items() if not ({m, m.qkv} & ignored_set)}
    # GluMlp: the same for its fc1 (Torch-Pruning maps its two halves onto fc2 wrongly)
    glus = {n: m for n, m in model.named_modules() if glu_mlp(m)}
    own_roots |= {m.fc1 for m in glus.values()}
    glus = {n: m for n, m in glus.items() if not ({m, m.fc1} & ignored_set)}
    limit = env_float("FAIR_PRUNER_GROUP_SEARCH_S", GROUP_SEARCH_LIMIT_S)
    with search_limits(limit, "the search for coupled channel groups", search_memory_limit()):
        try:
            all_groups = list(DG.get_all_groups(ignored_layers=list(ignored) + list(own_roots),
                                                root_module_types=PRODUCER_TYPES))
        except (IndexError, KeyError, ValueError, RuntimeError, ZeroDivisionError) as exc:
            raise UnsupportedModelError(
                f"Torch-Pruning's search for coupled channel groups failed on this model "
                f"({type(exc).__name__}: {exc}): an op it cannot map channels through (a "
                "reshape that interleaves channels, a split after one). Keep the layers "
                "around that op whole with ignore=[...]") from exc
    for g in all_groups:
        root = g[0].dep.target.module
        if root in inside_mha:        # never called as a module (F.multi_head_attention_forward)
            continue
        interleave = _interleave(DG, g)
        if interleave is None:
            if skipped is not None:
                skipped.append(names[root])
            continue
        why = []
        for it in g.items:
            m = it.dep.target.module
            nm = names.get(m) or pnames.get(m) or type(m).__name__
            if m in inside_mha:
                m, nm = model.get_submodule(inside_mha[m]), inside_mha[m]
            r = _refusal(m, nm, tied, calls)
            if r is not None and r not in why:
                why.append(r)
        if why:
            refused.append((names[root], why))
            continue
        n = len(g[0].idxs) // interleave
        spec = GroupSpec(name=names[root], size=n, root=names[root], interleave=interleave)
        for item in g.items:
            mod = item.dep.target.module
            role = _role(DG, mod, item.dep.handler)
            if role is None or mod not in names:
                continue
            spec.members.append(Member(names[mod], role, item_idxs(item.idxs),
                                       [int(i) % n for i in item.root_idxs]))
        if not spec.producers:
            continue
        spec.name = group_name(spec.root, [m.module for m in spec.producers])
        specs.append(spec)
        if tp_groups is not None:
            tp_groups[spec.name] = g
    if refused:
        reasons = []
        for _, why in refused:
            reasons.extend(w for w in why if w not in reasons)
        roots = [r for r, _ in refused]
        raise UnsupportedModelError(
            f"{len(refused)} pruning group(s) touch layers fair_pruner cannot prune exactly: "
            + "; ".join(reasons[:6]) + ("; ..." if len(reasons) > 6 else "")
            + f". To prune the rest and keep these groups whole, pass ignore={roots[:8]!r}"
            + (" (and the rest of the groups' roots)" if len(roots) > 8 else ""))
    for n, m in heads.items():
        if calls.get(m.qkv, 1) == 1 and calls.get(m.proj, 1) == 1:
            specs.append(head_spec(n, m))
    for n, m in glus.items():
        if calls.get(m.fc1, 1) == 1 and calls.get(m.fc2, 1) == 1:
            specs.append(glu_spec(n, m))
    specs.sort(key=lambda s: order[s.root])
    if len({s.name for s in specs}) != len(specs):        # a module named like "x+1"
        raise UnsupportedModelError("two pruning groups would share a name: "
                                    f"{sorted(s.name for s in specs)}")
    return specs


def _param_dims(DG, module: nn.Module, handler) -> Dict[str, int]:
    """Which dim of each parameter of ``module`` a pruning handler shrinks."""
    out = DG.is_out_channel_pruning_fn(handler)
    if isinstance(module, nn.Parameter):
        for up in DG.unwrapped_parameters:
            if up.parameters is module:
                return {"": up.pruning_dim}
        return {}
    if isinstance(module, CONV_TYPES):
        depthwise = module.groups == module.in_channels == module.out_channels and module.groups > 1
        if out:
            return {"weight": 0, "bias": 0}
        return {} if module.groups > 1 and depthwise else {"weight": 1}
    if isinstance(module, nn.Linear):
        return {"weight": 0, "bias": 0} if out else {"weight": 1}
    if isinstance(module, NORM_TYPES + (nn.PReLU,)):
        return {"weight": 0, "bias": 0} if out else {}
    if isinstance(module, nn.Embedding):
        return {"weight": 1} if out else {}
    return {}


def build_cost_model(model: nn.Module, DG, groups: Sequence[GroupSpec],
                     out_positions: Dict[str, int],
                     tp_groups: Optional[Dict[str, Any]] = None) -> CostModel:
    """Cost terms for every parameter of ``model`` (and MACs of every Conv/Linear);
    ``tp_groups``: the Torch-Pruning groups :func:`find_groups` found (else searched again)."""
    name_of = {m: n for n, m in model.named_modules()}
    pname_of = {p: n for n, p in model.named_parameters()}
    b = CostBuilder()
    glus = glus_by_fc1(model)
    for gi, spec in enumerate(groups):
        attn = model.get_submodule(spec.root_module)
        if head_attention(attn):
            width = {"qkv": qkv_rows_per_head(attn), "features": attn.head_dim, "heads": 1}
            for owner, attr, d, layout in head_tensors(attn):
                b.dim((f"{name_of[owner]}.{attr}".lstrip("."), d),
                      getattr(owner, attr).shape[d], gi, width[layout])
            continue
        glu = glus.get(attn)               # the root is a GluMlp's fc1
        if glu is not None:
            for owner, attr, d, per_unit in glu_tensors(glu):
                b.dim((f"{name_of[owner]}.{attr}", d), getattr(owner, attr).shape[d], gi,
                      per_unit)
            continue
        g = (tp_groups or {}).get(spec.name)
        if g is None:
            root = model.get_submodule(spec.root_module)
            pruner = DG.get_pruner_of_module(root)
            g = DG.get_pruning_group(root, pruner.prune_out_channels,
                                     list(range(spec.size * spec.interleave)))
        for item in g.items:
            mod = item.dep.target.module
            dims = _param_dims(DG, mod, item.dep.handler)
            if not dims:
                continue
            width = len(item.idxs) / spec.size       # channels of ``mod`` per unit
            if _grouped_conv(mod) and not DG.is_out_channel_pruning_fn(item.dep.handler):
                width /= mod.groups     # its weight holds in_channels / groups input channels
            if isinstance(mod, nn.Parameter):
                pname = pname_of.get(mod)
                if pname is not None:
                    b.dim((pname, dims[""]), mod.shape[dims[""]], gi, width)
                continue
            prefix = name_of.get(mod)
            if prefix is None:
                continue
            for attr, d in dims.items():
                p = getattr(mod, attr, None)
                if isinstance(p, torch.Tensor):
                    pname = f"{prefix}.{attr}" if prefix else attr
                    b.dim((pname, d), p.shape[d], gi, width)

    for pname, p in model.named_parameters():
        keys = [(pname, d) for d in range(p.dim()) if b.has_dim((pname, d))]
        free = math.prod(n for d, n in enumerate(p.shape) if (pname, d) not in keys)
        b.term(free, keys)
        mod_name, _, attr = pname.rpartition(".")
        if attr == "weight" and mod_name in out_positions:
            b.term(free * out_positions[mod_name], keys, mac=True)
    return b.build()


# --------------------------------------------------------------------------------------------
# Applying removals, the masked reference, and the exactness self-check
# --------------------------------------------------------------------------------------------

def unit_channels(idxs: Sequence[int], size: int, interleave: int = 1) -> List[int]:
    """Root channels of units ``idxs`` of a group of ``size`` units (see
    :attr:`GroupSpec.interleave`)."""
    return sorted(int(j) + k * size for j in idxs for k in range(interleave))


def prune_units(model: nn.Module, DG, roots: Dict[str, nn.Module],
                removed: Dict[str, Sequence[int]], sizes: Optional[Dict[str, int]] = None,
                interleave: Optional[Dict[str, int]] = None) -> None:
    """Remove ``removed[name]`` (root unit indices) of every group through ``DG``, in place;
    groups in ``interleave`` (units of several channels, of ``sizes[name]`` units) lose every
    channel of each unit."""
    interleave = interleave or {}
    glus = glus_by_fc1(model)
    for name, idxs in removed.items():
        if not idxs:
            continue
        mod = roots[name]
        if head_attention(mod):
            prune_heads(mod, idxs)
            continue
        if mod in glus:
            prune_glu(glus[mod], idxs)
            continue
        pruner = DG.get_pruner_of_module(mod)
        chans = unit_channels(idxs, sizes[name], interleave[name]) if name in interleave \
            else list(idxs)
        DG.get_pruning_group(mod, pruner.prune_out_channels, chans).prune()
    refresh_sizes(model)


class MaskedLayerNorm(nn.Module):
    """LayerNorm over the kept channels only, zero on removed ones (what pruning computes)."""

    def __init__(self, ln: nn.LayerNorm, keep: torch.Tensor, channels_first: bool):
        super().__init__()
        self.ln, self.keep, self.channels_first = ln, keep, channels_first

    def forward(self, x):
        if self.channels_first:
            x = x.permute(0, *range(2, x.dim()), 1)
        k = self.keep.to(x.device)
        w = self.ln.weight[k] if self.ln.weight is not None else None
        b = self.ln.bias[k] if self.ln.bias is not None else None
        y = torch.zeros_like(x)
        y[..., k] = F.layer_norm(x[..., k], (k.numel(),), w, b, self.ln.eps)
        if self.channels_first:
            y = y.permute(0, x.dim() - 1, *range(1, x.dim() - 1))
        return y


def channels_by_role(specs: Sequence[GroupSpec], removed: Dict[str, Sequence[int]],
                     role: str) -> Dict[str, List[int]]:
    """Member module of ``role`` -> its channels (a Linear consumer: features) removed."""
    out: Dict[str, List[int]] = {}
    for spec in specs:
        rem = set(removed.get(spec.name, []))
        if not rem:
            continue
        for m in spec.members:
            if m.role == role:
                out.setdefault(m.module, []).extend(i for i, r in zip(m.idxs, m.root_idxs)
                                                    if r in rem)
    return {k: sorted(set(v)) for k, v in out.items() if v}


def mask_units(masked: nn.Module, specs: Sequence[GroupSpec],
               removed: Dict[str, Sequence[int]]) -> nn.Module:
    """Zero, in place, the removed units of ``masked`` where they are consumed (and compute
    channel norms over the kept channels only): the reference pruning must equal."""
    mods = dict(masked.named_modules())
    for name, chans in channels_by_role(specs, removed, "consumer").items():
        mod = mods[name]
        dim = -1 if isinstance(mod, nn.Linear) else 1
        idx = torch.tensor(chans)

        def pre(module, args, idx=idx, dim=dim):
            x = args[0].clone()
            x.index_fill_(dim % x.dim(), idx.to(x.device), 0)
            return (x,) + tuple(args[1:])
        mod.register_forward_pre_hook(pre)
    for name, gone in channels_by_role(specs, removed, "norm").items():
        ln = mods[name]
        n, gone = ln.normalized_shape[-1], set(gone)
        keep = torch.tensor([i for i in range(n) if i not in gone])
        channels_first = type(ln).__name__ == "LayerNorm2d"
        parent, _, attr = name.rpartition(".")
        # torchvision's LayerNorm2d normalises dim 1; the wrapper replaces its forward wholesale.
        setattr(mods[parent] if parent else masked, attr, MaskedLayerNorm(ln, keep, channels_first))
    return masked


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A copy with every parameter and norm statistic jittered, so near-zero initialisations
    (zero heads, 1e-6 layer scales, GRN's zero gamma) cannot hide an inexact removal."""
    m = copy_model(model).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.is_floating_point() and p.numel():
                std = float(p.double().std()) if p.numel() > 1 else float(p.double().abs())
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
                p.add_((noise * max(0.5 * std, 0.05)).to(p.dtype).to(p.device))
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.running_mean is not None:
                rm, rv = mod.running_mean, mod.running_var
                rm.add_((torch.randn(rm.shape, generator=g) * 0.1).to(rm))
                rv.mul_((torch.rand(rv.shape, generator=g) + 0.5).to(rv))
    return m


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    vals = list(out.values()) if isinstance(out, dict) or hasattr(out, "keys") else (
        list(out) if isinstance(out, (tuple, list)) else [])
    for v in vals:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _all_tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    vals = list(out.values()) if isinstance(out, dict) or hasattr(out, "keys") else (
        list(out) if isinstance(out, (tuple, list)) else [])
    return [t for v in vals for t in _all_tensors(v)]


def _measure(model: nn.Module, example: Any, call) -> tuple:
    """(outputs, params, Conv/Linear MACs per sample) of one forward: weight numel x output
    positions per sample (rows included: windowed attention folds windows into the batch)."""
    macs, done = [0], set()
    x = first_tensor(example)
    rows = max(1, x.shape[0]) if x is not None and x.dim() >= 1 else 1

    def hook(m, i, o):
        if isinstance(o, torch.Tensor) and o.dim() >= 1 and o.shape[0] and m not in done:
            done.add(m)
            units = o.shape[-1] if isinstance(m, nn.Linear) else o.shape[1]
            macs[0] += m.weight.numel() * (o.numel() // max(1, units) // rows)

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRODUCER_TYPES)]
    try:
        with torch.no_grad():
            out = call(model, example)
    finally:
        for h in hs:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return _all_tensors(out), params, macs[0]


def _odd_members(model: nn.Module, DG, spec: GroupSpec) -> List[str]:
    """What else a group touches besides Conv/Linear/norm layers and traced ops: its loose
    parameters (a layer scale, a GRN's gamma) and other modules, by name."""
    names = {m: n for n, m in model.named_modules()}
    pnames = {p: n for n, p in model.named_parameters()}
    root = model.get_submodule(spec.root)
    if head_attention(root):
        return []
    pruner = DG.get_pruner_of_module(root)
    out: List[str] = []
    for it in DG.get_pruning_group(root, pruner.prune_out_channels, [0]).items:
        m = it.dep.target.module
        if isinstance(m, nn.Parameter):
            n = pnames.get(m)
        elif isinstance(m, PRODUCER_TYPES + NORM_TYPES) or type(m).__module__.startswith(
                "torch_pruning"):
            continue
        else:
            n = names.get(m)
        if n is not None and n not in out:
            out.append(n)
    return out


def _in_float64(model: nn.Module, example: Any, call) -> tuple:
    """``model`` (a copy of the caller's: converted in place) and the floating tensors of
    ``example`` in float64 when the model runs so; else both as they were."""
    def to64(t):
        return t.double() if t.is_floating_point() else t
    # (module, buffer name) -> dtype: .double() replaces buffers by new tensors (parameters
    # keep their objects), so a failed conversion is undone through the modules
    params = [(p, p.dtype) for p in model.parameters()]
    buffers = {(mod, n): b.dtype for mod in model.modules() for n, b in mod._buffers.items()
               if b is not None}
    if all(dt == torch.float64 or not dt.is_floating_point
           for dt in [d for _, d in params] + list(buffers.values())):
        return model, example
    model.double()
    ex64 = map_tensors(example, to64)
    try:
        with torch.no_grad():
            call(model, ex64)
    except Exception:           # an op without a float64 kernel: check in the model's dtype
        for p, dt in params:
            p.data = p.data.to(dt)
        for (mod, n), dt in buffers.items():
            if mod._buffers.get(n) is not None:
                mod._buffers[n] = mod._buffers[n].to(dt)
        return model, example
    return model, ex64


# Structures whose self-check passed in this process (bounded, most recent last): scoring the same
# architecture again (another calibration set, a sweep, a benchmark) skips the check.
_CHECKED: "collections.OrderedDict[str, None]" = collections.OrderedDict()
_CHECKED_MAX = 64


def _simple(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str)) or (
        isinstance(v, (tuple, list)) and all(_simple(x) for x in v))


def _check_key(model: nn.Module, example: Any, specs: Sequence[GroupSpec], seed: int,
               tol: float, call) -> str:
    """What the self-check's verdict depends on: parameter names and shapes, every module's
    class (module and qualified name), its plain attributes (stride, flags that change its
    forward) and any function bound on the instance, the example's shapes and dtypes, the
    groups, the seed and tolerance."""
    h = hashlib.sha256(model_fingerprint(model).encode())
    for name, m in model.named_modules():
        cls = type(m)
        h.update(f"{name}:{cls.__module__}.{cls.__qualname__};".encode())
        for k, v in sorted(vars(m).items()):
            if k.startswith("_") and k not in ("_forward_hooks", "_forward_pre_hooks"):
                continue
            if _simple(v):
                h.update(f"{k}={v!r};".encode())
            elif callable(v) and not isinstance(v, nn.Module):
                h.update(f"{k}=<{getattr(v, '__qualname__', type(v).__name__)}>;".encode())
            elif isinstance(v, dict) and k.startswith("_forward"):
                h.update(f"{k}={len(v)};".encode())
    def shapes(t):
        h.update(f"{tuple(t.shape)}{t.dtype}{t.device.type};".encode())
        return t
    map_tensors(example, shapes)
    for sp in specs:
        h.update(repr((sp.name, sp.size, sp.root, sp.interleave,
                       [(m.module, m.role, m.idxs, m.root_idxs) for m in sp.members])).encode())
    h.update(f"{seed};{tol};{getattr(call, '__qualname__', call)!s}".encode())
    return h.hexdigest()


def check_exact(model: nn.Module, example: Any, specs: Sequence[GroupSpec], cost: CostModel,
                call, seed: int = 0, tol: float = 1e-4, DG=None) -> None:
    """Self-check before scoring: remove about a quarter of the units of every group from a
    jittered copy of ``model`` (Torch-Pruning surgery, as :func:`fair_pruner.prune` does) and
    compare with the masked reference on ``example`` and with the cost model. Raises
    :class:`UnsupportedModelError` naming the group(s) whose removal is not exact (an op that
    removes more channels than the group holds, a channel-mixing op between producer and
    consumer such as a global response norm, ...)."""
    rng = random.Random(f"fair_pruner.self_check:{seed}")
    removed = {s.name: sorted(rng.sample(range(s.size), max(1, s.size // 4)))
               for s in specs if s.size >= 2}
    if not removed:
        return
    key = _check_key(model, example, specs, seed, tol, call)
    if key in _CHECKED:
        _CHECKED.move_to_end(key)
        return
    def finite(m, ex):
        return all(bool(torch.isfinite(t).all()) for t in _measure(m, ex, call)[0]
                   if t.is_floating_point())

    def reference() -> Tuple[nn.Module, bool]:
        """The jittered copy every comparison starts from (seeded: the same each time it is
        made), and whether outputs can be compared."""
        ref = _perturbed(model, seed)
        if finite(ref, example):
            return ref, True
        ref = copy_model(model).eval()          # the jitter overflowed: as it is
        return ref, finite(ref, example)        # NaN inputs: counts only (calibration reports)
    ref, outputs = reference()
    ex = example
    # First in the model's dtype (cheap); a difference is confirmed in float64 before it is
    # reported: pruned and masked differ only in summation order, but a deep net with
    # jittered weights amplifies that: fp32 outputs of EfficientNet-V2-L differ by 36% where
    # fp64 ones agree to 2e-7 (a false refusal, or a real error hidden in the noise).
    # Each round prunes ref itself instead of a copy (a 600M-parameter model's 2.4 GB off the
    # check's peak); a later round makes the same reference again.
    in64 = False
    bad = _exact_errors(ref, ex, specs, cost, call, removed, tol, outputs, consume=True)
    ref = None
    if bad and any(t.is_floating_point() and t.dtype != torch.float64
                   for t in itertools.chain(model.parameters(), model.buffers())):
        in64 = True
        ref, outputs = reference()
        bad = _exact_errors(ref, ex, specs, cost, call, removed, tol, outputs, in64,
                            consume=True)
        ref = None
    if bad:                                     # naming the culprits needs it whole
        ref, outputs = reference()
    if not bad:
        _CHECKED[key] = None
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)
        return
    # Name the culprits: the same check one group at a time.
    culprits = []
    for s in specs:
        if s.name in removed and _exact_errors(ref, ex, specs, cost, call,
                                               {s.name: removed[s.name]}, tol, outputs, in64):
            culprits.append(s)
    shown = culprits or list(specs)
    desc = []
    for s in shown[:6]:
        odd = _odd_members(model, DG, s) if DG is not None else []
        desc.append(f"{s.name} (producers {[m.module for m in s.producers][:4]}"
                    + (f", through {odd[:4]}" if odd else "") + ")")
    raise UnsupportedModelError(
        f"removing units of group(s) {', '.join(desc)} is not exact on this model ({bad[0]}): "
        "an operation between their producers and consumers removes more channels than the "
        "group holds, or mixes channels (e.g. a normalisation across channels such as "
        "ConvNeXt-V2's global response norm). Keep these groups whole with "
        f"ignore={[s.root for s in shown[:8]]!r}")


def _big(model: nn.Module) -> bool:
    """Worth a full garbage collection to free a copy of it: over 256 MiB of parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 256 << 20


def _exact_errors(ref: nn.Module, example: Any, specs: Sequence[GroupSpec], cost: CostModel,
                  call, removed: Dict[str, Sequence[int]], tol: float,
                  outputs: bool = True, in64: bool = False, consume: bool = False) -> List[str]:
    """What differs between ``ref`` with ``removed`` pruned and masked, each compared in float64
    with ``in64`` (each copy converted after surgery: ``ref`` stays in its dtype, so a
    600M-parameter model holds one float64 copy at a time, not two). With ``consume``, ``ref``
    itself is pruned (after the masked reference is measured on a copy), one model copy fewer
    at the check's peak: the caller must not use ``ref`` again."""
    idx = {s.name: i for i, s in enumerate(specs)}
    vec = torch.zeros(len(specs), dtype=torch.float64)
    for n, r in removed.items():
        vec[idx[n]] = len(r)
    want_p, want_m = (int(round(float(v))) for v in cost.evaluate(vec))
    errs: List[str] = []

    def run_pruned(pruned: nn.Module):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                DG = build_dependency_graph(pruned, example)
                prune_units(pruned, DG, {n: pruned.get_submodule(specs[idx[n]].root)
                                         for n in removed}, removed,
                            {s.name: s.size for s in specs},
                            {s.name: s.interleave for s in specs if s.interleave != 1})
                ex = example
                if in64:
                    pruned, ex = _in_float64(pruned, example, call)
                return _measure(pruned, ex, call), None
        except Exception as exc:        # pruned model no longer runs
            return None, f"the pruned model fails: {type(exc).__name__}: {str(exc)[:120]}"

    def run_masked(masked: nn.Module):
        try:
            masked = mask_units(masked, specs, removed)
            ex = example
            if in64:
                masked, ex = _in_float64(masked, example, call)
            return _measure(masked, ex, call)[0], None
        except Exception as exc:        # the group's indices do not fit its consumers
            return None, f"the masked reference fails: {type(exc).__name__}: {str(exc)[:120]}"

    # One model copy at a time. Torch-Pruning's graph holds reference cycles through the model
    # it pruned (and its replaced parameters), freed only by gc (costly in a big process).
    big = _big(ref)
    if consume:
        out_m, merr = run_masked(copy_model(ref))
        measured, perr = run_pruned(ref)
    else:
        measured, perr = run_pruned(copy_model(ref))
        if big:
            gc.collect()
        out_m, merr = (None, None) if perr else run_masked(copy_model(ref))
    if big:
        gc.collect()
    if perr or merr:
        return [perr or merr]
    out_p, params, macs = measured
    if params != want_p:
        errs.append(f"{params} parameters after pruning, the plan counts {want_p}")
    if macs != want_m:
        errs.append(f"{macs} MACs after pruning, the plan counts {want_m}")
    if len(out_p) != len(out_m):
        errs.append("the pruned model returns different outputs")
    for a, b in zip(out_p, out_m):
        if a.shape != b.shape:
            errs.append(f"output shape {tuple(a.shape)} instead of {tuple(b.shape)}")
        elif a.is_floating_point() and outputs:
            scale = float(b.abs().max().clamp(min=1e-3)) if b.numel() else 1.0
            d = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            if not d <= tol * scale:
                errs.append(f"pruned and masked outputs differ by {d:.3g} (scale {scale:.3g})")
    return errs
