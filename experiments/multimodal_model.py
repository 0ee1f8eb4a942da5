"""The multimodal model (conv autoencoder + prefix-conditioned caption transformer + caption
encoder) and its losses and metrics."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ImageEncoder(nn.Module):
    def __init__(self, channels: int, size: int, layers: int, width: int, latent_dim: int):
        super().__init__()
        blocks, c_in, s = [], channels, size
        for i in range(layers):
            c_out = width * 2 ** min(i, 2)
            stride = 2 if s > 4 else 1  # downsample to about 3x3, then keep the size
            # BatchNorm, not GroupNorm: with GroupNorm (per-image statistics, over 3x3 maps in
            # the last blocks) the encoder never learned the hatching's angle and density: in
            # the default run both stayed at chance, on training images too, for all 1,606
            # steps, and so did an encoder trained on them alone for 600 steps. With BatchNorm
            # that encoder reads both (~95%) within 200 steps.
            blocks += [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.BatchNorm2d(c_out), nn.GELU()]
            c_in, s = c_out, (s + 1) // 2 if stride == 2 else s
        self.net = nn.Sequential(*blocks)
        self.out_shape = (c_in, s, s)
        self.proj = nn.Linear(c_in * s * s, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.net(x).flatten(1))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last conv block's map (B, C, s, s) and the latent (B, latent_dim)."""
        h = self.net(x)
        return h, self.proj(h.flatten(1))


class ImageDecoder(nn.Module):
    def __init__(self, channels: int, size: int, layers: int, width: int, latent_dim: int):
        super().__init__()
        self.size = size
        ups = 0
        s = size
        while s > 4 and ups < layers:
            s, ups = (s + 1) // 2, ups + 1
        self.start = (width * 4, s, s)
        self.proj = nn.Linear(latent_dim, width * 4 * s * s)
        blocks, c_in = [], width * 4
        for i in range(ups):
            c_out = width * 2 ** max(0, 1 - i)
            blocks += [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1),
                nn.GroupNorm(8, c_out),
                nn.GELU(),
            ]
            c_in = c_out
        blocks.append(nn.Conv2d(c_in, channels, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.net(self.proj(z).view(-1, *self.start))
        if h.shape[-1] != self.size:  # sizes that are not a power of two times the start
            h = F.interpolate(h, size=(self.size, self.size), mode="bilinear")
        return torch.sigmoid(h)


def _transformer(dim: int, layers: int, heads: int, dropout: float) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(
        dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class MultimodalModel(nn.Module):
    """The sizes come from ``model`` (the config's MultimodalModelConfig section); the rest
    from the data and the tokenizer."""

    def __init__(self, model, *, vocab_size: int, max_len: int, channels: int, image_size: int,
                 pad_id: int):  # fmt: skip
        super().__init__()
        layers, width, latent_dim = model.image_encoder_layers, model.conv_width, model.latent_dim
        embedding_dim, prefix_tokens = model.embedding_dim, model.prefix_tokens
        num_heads, dropout = model.num_heads, model.dropout
        self.pad_id, self.max_len, self.prefix_tokens = pad_id, max_len, prefix_tokens
        self.encoder = ImageEncoder(channels, image_size, layers, width, latent_dim)
        self.decoder = ImageDecoder(channels, image_size, layers, width, latent_dim)
        # The caption decoder reads the image as a prefix (GPT-style): a few tokens from the
        # latent, then one token per cell of the encoder's last conv map (3x3 at 48x48, the
        # scene's grid). Through the latent alone the hatching angle stayed at chance (density
        # was learned, caption accuracy 0.93); a cell token holds its object's texture where
        # the object is, so the caption gradient reaches the conv features that see it (angle
        # ~0.9 and accuracy ~0.99 after 22 epochs).
        self.prefix = nn.Linear(latent_dim, prefix_tokens * embedding_dim)
        c, s, _ = self.encoder.out_shape
        self.grid_tokens = s * s
        self.grid = nn.Linear(c, embedding_dim)
        self.tok = nn.Embedding(vocab_size, embedding_dim)
        self.num_prefix = prefix_tokens + self.grid_tokens
        self.pos = nn.Parameter(torch.zeros(1, self.num_prefix + max_len, embedding_dim))
        self.text = _transformer(embedding_dim, model.transformer_layers, num_heads, dropout)
        self.ln = nn.LayerNorm(embedding_dim)
        self.head = nn.Linear(embedding_dim, vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied, as in nanoGPT
        self.cap_pos = nn.Parameter(torch.zeros(1, max_len, embedding_dim))
        self.cap_enc = _transformer(embedding_dim, model.caption_encoder_layers, num_heads, dropout)
        self.cap_proj = nn.Linear(embedding_dim, latent_dim)
        # CLIP's learnable temperature, initialised at 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.tok.weight, std=0.02)  # tied to the head: N(0, 1) logits explode
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cap_pos, std=0.02)
        mask = torch.triu(torch.full((self.num_prefix + max_len,) * 2, float("-inf")), 1)
        self.register_buffer("causal", mask, persistent=False)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def image_prefix(self, fmap: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The caption decoder's prefix (B, prefix_tokens + cells, E) from the encoder's last
        conv map ``fmap`` and the latent ``z``."""
        latent_tokens = self.prefix(z).view(len(z), self.prefix_tokens, -1)
        cells = self.grid(fmap.flatten(2).transpose(1, 2))  # (B, s*s, E), reading order
        return torch.cat([latent_tokens, cells], 1)

    def caption_logits(self, prefix: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Next-token logits for ``tokens`` (B, T) given the image prefix (``image_prefix``)."""
        n = self.num_prefix + tokens.shape[1]
        h = torch.cat([prefix, self.tok(tokens)], 1) + self.pos[:, :n]
        h = self.text(h, mask=self.causal[:n, :n], is_causal=True)
        return self.head(self.ln(h[:, self.num_prefix :]))

    def encode_caption(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = (tokens != self.pad_id).unsqueeze(-1).float()
        h = self.tok(tokens) + self.cap_pos[:, : tokens.shape[1]]
        h = self.cap_enc(h, src_key_padding_mask=tokens == self.pad_id)
        return self.cap_proj((h * keep).sum(1) / keep.sum(1).clamp_min(1))  # mean over words

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap, z = self.encoder.features(images)
        return {
            "latent": z,
            "recon": self.decoder(z),
            "logits": self.caption_logits(self.image_prefix(fmap, z), tokens[:, :-1]),
            "caption_latent": self.encode_caption(tokens),
        }

    @torch.no_grad()
    def generate(self, images: torch.Tensor, bos: int, eos: int) -> torch.Tensor:
        """Greedy captions (B, max_len), bos first."""
        prefix = self.image_prefix(*self.encoder.features(images))
        out = torch.full((images.shape[0], 1), bos, dtype=torch.long, device=images.device)
        done = torch.zeros(images.shape[0], dtype=torch.bool, device=images.device)
        for _ in range(self.max_len - 1):
            nxt = self.caption_logits(prefix, out)[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos
            if done.all():
                break
        return out


# -- losses and metrics -------------------------------------------------------------------------


def alignment_loss(
    z_img: torch.Tensor, z_cap: torch.Tensor, kind: str, logit_scale: torch.Tensor
) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(z_img, z_cap)
    a, b = F.normalize(z_img, dim=-1), F.normalize(z_cap, dim=-1)
    if kind == "cosine":
        return (1 - (a * b).sum(-1)).mean()
    # InfoNCE (CLIP's ClipLoss): symmetric cross-entropy over the similarity matrix
    logits = logit_scale.exp().clamp(max=100) * a @ b.T
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def caption_metrics(logits: torch.Tensor, targets: torch.Tensor, pad_id: int) -> dict[str, float]:
    """Token accuracy, perplexity (exp of mean CE) and mean prediction entropy over non-pad
    targets. ``logits`` (B, T, V), ``targets`` (B, T)."""
    keep = targets != pad_id
    n = keep.sum().clamp_min(1)
    logp = logits.float().log_softmax(-1)
    ce = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    correct = (logits.argmax(-1) == targets) & keep
    return {
        "caption_accuracy": float(correct.sum() / n),
        "caption_perplexity": float(torch.exp((ce * keep).sum() / n)),
        "caption_entropy": float((entropy * keep).sum() / n),
    }


def latent_stats(z: torch.Tensor) -> dict[str, float]:
    z = z.detach().float()
    return {
        "latent_mean": float(z.mean()),
        "latent_std": float(z.std()),
        "latent_min": float(z.min()),
        "latent_max": float(z.max()),
        "latent_norm": float(z.norm(dim=-1).mean()),  # mean L2 norm of a latent vector
    }


def grad_stats(params: list[nn.Parameter]) -> dict[str, float]:
    grads = torch.cat([p.grad.detach().flatten() for p in params if p.grad is not None])
    return {
        "grad_mean": float(grads.abs().mean()),
        "grad_std": float(grads.std()),
        "grad_max": float(grads.abs().max()),
    }


def retrieval_top1(z_img: torch.Tensor, z_cap: torch.Tensor) -> float:
    """Image-to-caption top-1 within the batch (chance is 1/batch)."""
    sim = F.normalize(z_img, dim=-1) @ F.normalize(z_cap, dim=-1).T
    return float((sim.argmax(1) == torch.arange(len(sim), device=sim.device)).float().mean())
