"""Train the embedded default model: a small Step3 (exact architecture) on the shapes task.

    .venv/bin/python train/train_default.py                # the shipped run (seed 0)
    .venv/bin/python train/train_default.py --steps 50 --out /tmp/try   # a quick trial

The model is built from `model_config()` and initialised from `--seed`; the data is
`step3_edge.tasks` scene `i` (training namespace, seed `--seed`), so the same command gives the
same weights on the same machine and thread count. Each scene is asked several questions; the
questions of one scene share one pass over the image prefix (packed rows with a block mask:
every question attends to the prefix and to itself only, with positions as in its own prompt,
so the math per question equals a separate forward of the reference model).

Writes a real-layout block-fp8 checkpoint with its (compact) tokenizer, `loss.png` and
`training.json` into `--out` (default: step3_edge/assets/default-model).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# OpenMP threads that spin at barriers crawl when other processes share the two cores
# (measured 7 s vs 0.7 s per step); must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from step3_edge.chat import DEFAULT_CHAT_TEMPLATE, render_chat
from step3_edge.config import Step3Config
from step3_edge.model import Step3ForConditionalGeneration, StackedExperts, rope_cos_sin
from step3_edge.presets import _vl
from step3_edge.processor import ImageViews, Step3Processor, image_views
from step3_edge.synth import write_checkpoint
from step3_edge.tasks import (COLOURS, SHAPES, TRAIN_SEED, Example, cell_labels,
                              make_training_item, target_text, task_texts)
from step3_edge.tokenizer import (BOS_TOKEN, BOT_TOKEN, EOS_TOKEN, EOT_TOKEN, IM_END, IM_START,
                                  IMAGE_TOKEN, PAD_TOKEN, PATCH_END, PATCH_NEWLINE, PATCH_START,
                                  THINK_END, THINK_START, build_synthetic_tokenizer,
                                  learn_merges)
from step3_edge.vision import project_features

sys.path.insert(0, str(Path(__file__).parent))
from plot import plot_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "step3_edge" / "assets" / "default-model"

# Compact ids: bos/eos/pad 0..2, the 256 byte tokens 3..258, the Step3 specials 259..268.
COMPACT_SPECIAL: dict[str, int] = {
    BOS_TOKEN: 0, EOS_TOKEN: 1, PAD_TOKEN: 2, IM_START: 259, IMAGE_TOKEN: 260, IM_END: 261,
    PATCH_START: 262, PATCH_NEWLINE: 263, PATCH_END: 264, BOT_TOKEN: 265, EOT_TOKEN: 266,
    THINK_START: 267, THINK_END: 268,
}
VOCAB_SIZE = 512              # ids 269.. hold the task words' BPE merges (136 with the defaults)
N_MERGES = 240                # at most this many; the trainer stops when no pair repeats
BACKGROUND = len(COLOURS)      # aux colour class of background tokens


class AuxHead(nn.Module):
    """Training-only linear probe on the 169 global-view tokens in the decoder's residual
    stream (after layer `--aux-layer`): the colour (or background) each token shows and the
    shape of each object (from the mean of its tokens' shape logits, `packed_loss`). Learning
    shapes through the answers alone stalls; this direct signal trains the ViT and the first
    decoder layers to make shapes linearly readable. Not shipped."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(hidden),
                                 nn.Linear(hidden, len(COLOURS) + 1 + len(SHAPES)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[..., hidden] -> colour-or-background logits [..., 7], shape logits [..., 5]."""
        out = self.net(x)
        return out[..., :len(COLOURS) + 1], out[..., len(COLOURS) + 1:]


def model_config(vit_layers: int = 2) -> Step3Config:
    """Step3 structure at small widths: 4 layers (0 and 3 dense, 1-2 MoE with 8 experts top-3
    and a shared expert), MFA with one K/V head; ViT 728 px / patch 14 with both downsamplers."""
    d = _vl({"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "head_dim": 64, "share_q_dim": 128, "intermediate_size": 256,
             "moe_num_experts": 8, "moe_intermediate_size": 64, "share_expert_dim": 64,
             "moe_layers_enum": "1,2"},
            {"hidden_size": 64, "num_hidden_layers": vit_layers, "num_attention_heads": 1,
             "intermediate_size": 256, "output_hidden_size": 128})
    d["text_config"]["vocab_size"] = VOCAB_SIZE
    d["text_config"]["max_position_embedding"] = d["text_config"]["max_seq_len"] = 4096
    d["image_token_id"] = COMPACT_SPECIAL[IMAGE_TOKEN]
    return Step3Config.from_dict(d)


def init_weights(model: Step3ForConditionalGeneration, seed: int, vit_attn_gain: float = 0.0
                 ) -> None:
    """Deterministic init: N(0, 1) token embeddings, N(0, 0.02) vision embeddings, fan-in
    scaled normal for linears and experts, residual output projections scaled down by the
    depth, and the ViT's post-attention LayerNorm weight at `vit_attn_gain`."""
    g = torch.Generator().manual_seed(seed)
    depth = model.config.text_config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:                       # norm weights
                p.fill_(vit_attn_gain if name.endswith("layer_norm1.weight") else 1.0)
            elif name == "model.embed_tokens.weight":
                p.normal_(0.0, 1.0, generator=g)
            elif "embed" in name and "patch" not in name or name.endswith("class_embedding"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                fan_in = p.shape[-1] if p.ndim <= 3 else math.prod(p.shape[1:])
                std = fan_in ** -0.5
                if name.endswith(("o_proj.weight", "down_proj.weight")) and "vision" not in name:
                    std /= math.sqrt(2 * depth)
                p.normal_(0.0, std, generator=g)
    assert all(not isinstance(m, StackedExperts) or m.weight.abs().sum() > 0
               for m in model.modules())


def task_merges() -> list[tuple[str, str]]:
    """BPE merges learned from the task's questions and answers (`task_texts`), so each task
    word ("Ġcolour", "triangle", ...) is one token: an answer is then one decision instead of
    a spelling, which the 4-layer model otherwise learns only slowly."""
    merges = learn_merges(task_texts(), N_MERGES)
    assert max(COMPACT_SPECIAL.values()) + 1 + len(merges) <= VOCAB_SIZE
    return merges


def compact_processor(cfg: Step3Config, merges: list[tuple[str, str]]) -> Step3Processor:
    return Step3Processor(build_synthetic_tokenizer(COMPACT_SPECIAL, merges), cfg,
                          DEFAULT_CHAT_TEMPLATE)


def prompt_parts(proc: Step3Processor) -> tuple[str, str]:
    """The chat-template text before and after the question of a one-image user turn
    (rendered once: Jinja compiles the template on every render)."""
    sentinel = "\x00QUESTION\x00"
    text, _ = render_chat([{"role": "user", "content": [
        {"type": "image", "image": "-"}, {"type": "text", "text": sentinel}]}],
        proc.chat_template)
    before, after = text.split(sentinel)
    return before, after


# ---------------------------------------------------------------------------- batches
@dataclass
class Packed:
    """One training batch: a row per scene = image prefix + every question's suffix."""

    ids: torch.Tensor           # [B, T] token ids (padding: PAD)
    positions: torch.Tensor     # [B, T] RoPE positions (each question continues the prefix)
    mask: torch.Tensor          # [B, T, T] bool: prefix + own question, causal
    label_at: torch.Tensor      # [L, 2] (row, index) whose next token is an answer token
    labels: torch.Tensor        # [L] the answer tokens
    question_of: torch.Tensor   # [L] question number of each answer token
    views: list[ImageViews]     # one per row
    n_questions: int
    glob_at: torch.Tensor       # [B, 169] row index of each global-view image token
    aux_colour: torch.Tensor    # [B, 169] colour index of each global-view token (6 = none)
    aux_shape: torch.Tensor     # [B, 169] shape index of each global-view token (-1 = none)
    aux_object: torch.Tensor    # [B, 169] which of the scene's shapes each token shows (-1)

    def to(self, device: torch.device) -> "Packed":
        """The batch with every tensor (image pixels included) on `device`."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in vars(self).items()}
        moved["views"] = [dataclasses.replace(v, global_view=v.global_view.to(device),
                                              crops=v.crops.to(device)) for v in self.views]
        return Packed(**moved)


def pack(items: list[list[Example]], proc: Step3Processor, parts: tuple[str, str]) -> Packed:
    """Tokenize scenes (each with its questions) into packed rows (see module docstring);
    `parts` is `prompt_parts(proc)`."""
    im_end = proc.tokenizer.token_to_id(IM_END)
    rows, segs, poss, views = [], [], [], []
    label_rows: list[tuple[int, int, int, int]] = []     # (row, index, label, question)
    aux_rows: list[list[tuple[int, int, int]]] = []      # per row: 169 (colour, shape, object)
    glob_rows: list[list[int]] = []                      # per row: 169 token indices
    q_total = 0
    for b, qs in enumerate(items):
        v = image_views(qs[0].image, proc.patcher, proc.crop_tokens, proc.global_tokens)
        views.append(v)
        row: list[int] = []
        seg: list[int] = []
        pos: list[int] = []
        for j, ex in enumerate(qs):
            ids, _ = proc(parts[0] + ex.question + parts[1], [v])
            p = max(i for i, t in enumerate(ids) if t == im_end) + 1
            if j == 0:
                row, seg, pos = ids[:p], [0] * p, list(range(p))
                cells = cell_labels(ex.image, ex.shapes).ravel().tolist()  # [169], raster
                slots = [i for i, t in enumerate(row) if t == proc.image_token_id]
                glob_rows.append(slots[-len(cells):])       # the global view comes last
                aux_rows.append([(list(COLOURS).index(ex.shapes[k].colour),
                                  SHAPES.index(ex.shapes[k].kind), k) if k >= 0
                                 else (BACKGROUND, -1, -1) for k in cells])
            target = proc.encode(target_text(ex.answer))
            suffix = ids[p:] + target
            start = len(row)
            row += suffix
            seg += [j + 1] * len(suffix)
            pos += list(range(p, p + len(suffix)))
            first = start + len(ids) - p - 1                 # predicts target[0]
            for k, tok in enumerate(target):
                label_rows.append((b, first + k, tok, q_total))
            q_total += 1
        rows.append(row)
        segs.append(seg)
        poss.append(pos)
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), COMPACT_SPECIAL[PAD_TOKEN], dtype=torch.long)
    seg = torch.full((len(rows), t), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), t), dtype=torch.long)
    for b, (r, s, p) in enumerate(zip(rows, segs, poss)):
        ids[b, :len(r)], seg[b, :len(s)], positions[b, :len(p)] = (
            torch.tensor(r), torch.tensor(s), torch.tensor(p))
    idx = torch.arange(t)
    causal = idx[None, :] <= idx[:, None]                                       # [T, T]
    sq, sk = seg[:, :, None], seg[:, None, :]                                   # [B,T,1] [B,1,T]
    mask = causal[None] & (sk >= 0) & ((sk == 0) | (sk == sq))                  # [B, T, T]
    mask[:, :, 0] |= sq[..., 0] < 0                          # padding queries see slot 0
    lr = torch.tensor(label_rows, dtype=torch.long)
    aux = torch.tensor(aux_rows, dtype=torch.long)                              # [B, 169, 3]
    return Packed(ids, positions, mask, lr[:, :2], lr[:, 2], lr[:, 3], views, q_total,
                  torch.tensor(glob_rows, dtype=torch.long), aux[..., 0], aux[..., 1],
                  aux[..., 2])


def image_features(model: Step3ForConditionalGeneration, views: list[ImageViews]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Vision features of a batch in token order (per image: crops then global view) [N, h],
    and the global views' alone [B, 169, h]. Global views and crops each go through the ViT
    as one batch."""
    heads = (model.vit_downsampler, model.vit_downsampler2, model.vit_large_projector)
    g = project_features(model.vision_model(torch.stack([v.global_view for v in views])),
                         *heads)                                                 # [B,169,h]
    crops = [v.crops for v in views if v.num_crops]
    c = project_features(model.vision_model(torch.cat(crops)), *heads) if crops else None
    feats, k = [], 0
    for i, v in enumerate(views):
        if v.num_crops:
            feats.append(c[k:k + v.num_crops].reshape(-1, g.shape[-1]))        # [n*81, h]
            k += v.num_crops
        feats.append(g[i])
    return torch.cat(feats), g                                                  # [N, h]


def packed_loss(model: Step3ForConditionalGeneration, aux_head: AuxHead, batch: Packed,
                aux_layer: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each question's mean answer-token cross entropy [n_questions], the auxiliary loss on
    the global-view tokens after decoder layer `aux_layer` (-1: on the vision features), and
    the fraction of objects whose shape the probe gets right. The auxiliary loss is the
    colour-or-background CE on every token plus the shape CE of each object on the mean of
    its tokens' shape logits: a token inside a shape sees uniform colour, so per-token shape
    labels are ambiguous and learn far more slowly (train/README.md)."""
    tc = model.config.text_config
    feats, glob = image_features(model, batch.views)
    x = model.model.embed_tokens(batch.ids)                                     # [B, T, h]
    slots = (batch.ids == model.config.image_token_id).nonzero(as_tuple=True)
    x = x.index_put(slots, feats.to(x.dtype))
    cos, sin = rope_cos_sin(batch.positions, tc.head_dim, tc.rope_theta, tc.rope_factor)
    for i, layer in enumerate(model.model.layers):
        x = layer(x, cos, sin, batch.mask[:, None], None)
        if i == aux_layer:
            glob = x[torch.arange(x.shape[0])[:, None], batch.glob_at]         # [B, 169, h]
    h = model.model.norm(x[batch.label_at[:, 0], batch.label_at[:, 1]])        # [L, h]
    tok_loss = F.cross_entropy(model.lm_head(h).float(), batch.labels, reduction="none")
    per_q = torch.zeros(batch.n_questions, device=tok_loss.device).index_add_(
        0, batch.question_of, tok_loss)
    count = torch.bincount(batch.question_of, minlength=batch.n_questions).clamp(min=1)
    colour_logits, shape_logits = aux_head(glob.flatten(0, 1))                  # [B*169, .]
    aux = F.cross_entropy(colour_logits.float(), batch.aux_colour.flatten())
    obj = batch.aux_object.flatten()                                            # [B*169]
    fg = obj >= 0
    if not bool(fg.any()):
        return per_q / count, aux, torch.zeros(())
    per_img = int(batch.aux_object.max()) + 1
    slot = (torch.arange(glob.shape[0], device=obj.device)[:, None] * per_img
            + batch.aux_object).flatten()[fg]                                   # object ids
    n = glob.shape[0] * per_img
    sums = torch.zeros(n, shape_logits.shape[-1], device=obj.device).index_add_(
        0, slot, shape_logits[fg].float())
    labels = torch.full((n,), -1, device=obj.device).index_put_(
        (slot,), batch.aux_shape.flatten()[fg])
    seen = torch.bincount(slot, minlength=n)
    keep = seen > 0
    obj_logits = sums[keep] / seen[keep, None]                                  # [objects, 5]
    aux = aux + F.cross_entropy(obj_logits, labels[keep])
    hit = (obj_logits.argmax(-1) == labels[keep]).float().mean().detach()
    return per_q / count, aux, hit


# ---------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(args: argparse.Namespace, merges: list[tuple[str, str]]
          ) -> tuple[Step3ForConditionalGeneration, list[float], float]:
    torch.manual_seed(args.seed)
    cfg = model_config(args.vit_layers)
    proc = compact_processor(cfg, merges)
    parts = prompt_parts(proc)
    model = Step3ForConditionalGeneration(cfg)
    init_weights(model, args.seed, args.vit_attn_gain)
    aux_head = AuxHead(cfg.text_config.hidden_size)
    device = torch.device(args.device)
    model.to(device)
    aux_head.to(device)
    model.train()
    groups = []
    named = [(f"aux.{n}", p) for n, p in aux_head.named_parameters()] + \
        list(model.named_parameters())
    for vision in (False, True):
        for decay in (True, False):
            params = [p for n, p in named
                      if n.startswith(("vision_model", "vit_", "aux.")) == vision
                      and (p.ndim >= 2 and "embed" not in n) == decay]
            groups.append({"params": params, "peak": args.vision_lr if vision else args.lr,
                           "weight_decay": args.weight_decay if decay else 0.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", unit="step", dynamic_ncols=True)
    ema = 0.0
    by_type: dict[str, float] = {}
    def scenes(step: int) -> tuple[list[list[Example]], Packed]:
        items = [make_training_item(args.seed, step * args.batch + i, args.questions)
                 for i in range(args.batch)]
        return items, pack(items, proc, parts)

    # the next batch is drawn and packed in a thread while this step computes
    pool = ThreadPoolExecutor(1)
    ahead = pool.submit(scenes, 0)
    for step in bar:
        items, batch = ahead.result()
        if step + 1 < args.steps:
            ahead = pool.submit(scenes, step + 1)
        batch = batch.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, group["peak"], args.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            per_q, aux, obj_acc = packed_loss(model, aux_head, batch, args.aux_layer)
        loss = per_q.mean() + args.aux_weight * aux
        for ex, lq in zip((e for it in items for e in it), per_q.tolist()):
            by_type[ex.qtype] = 0.97 * by_type.get(ex.qtype, lq) + 0.03 * lq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        losses.append(per_q.mean().item())
        for key, v in (("aux", aux.item()), ("object_shape_acc", obj_acc.item())):
            by_type[key] = 0.97 * by_type.get(key, v) + 0.03 * v
        ema = losses[-1] if step == 0 else 0.95 * ema + 0.05 * losses[-1]
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if args.log_every and (step + 1) % args.log_every == 0:
            tqdm.write(f"step {step + 1} loss {ema:.4f} " +
                       " ".join(f"{k}={v:.3f}" for k, v in sorted(by_type.items())))
    return model.cpu().eval(), losses, time.perf_counter() - t0


def save(model: Step3ForConditionalGeneration, merges: list[tuple[str, str]], out: Path,
         losses: list[float], seconds: float, args: argparse.Namespace) -> None:
    weights = {n: t.detach().to(torch.bfloat16) for n, t in model.state_dict().items()}
    write_checkpoint(model.config, out, "block-fp8", weights=weights, overwrite=True,
                     progress=False, special=COMPACT_SPECIAL, merges=merges)
    plot_loss(losses, out / "loss.png", title=f"step3-edge default model, seed {args.seed}")
    tail = losses[-50:]
    info = {"seed": args.seed, "steps": args.steps, "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / args.steps, 3),
            "final_loss": round(sum(tail) / len(tail), 5), "last_step_loss": round(losses[-1], 5),
            "threads": torch.get_num_threads(), "answer_format": "</think>{answer}<|EOT|>",
            "command": " ".join(sys.argv),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "loss_every_50_steps": [round(v, 4) for v in losses[::50]]}
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=4, help="scenes per step")
    p.add_argument("--questions", type=int, default=6, help="questions per scene")
    p.add_argument("--lr", type=float, default=2e-3, help="peak LR of the language model")
    p.add_argument("--vision-lr", type=float, default=1e-3,
                   help="peak LR of the ViT, downsamplers, projector (and the aux head)")
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu",
                   help="torch device to train on (the shipped model is trained on the CPU)")
    p.add_argument("--vit-layers", type=int, default=2)
    p.add_argument("--vit-attn-gain", type=float, default=0.0,
                   help="initial weight of the ViT post-attention LayerNorm")
    p.add_argument("--aux-weight", type=float, default=3.0,
                   help="weight of the image-token colour / object-shape loss (0 = off)")
    p.add_argument("--aux-layer", type=int, default=1,
                   help="decoder layer after which the aux probe reads (-1: vision features)")
    p.add_argument("--log-every", type=int, default=100, help="print per-type losses every N")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    merges = task_merges()
    model, losses, seconds = train(args, merges)
    save(model, merges, args.out, losses, seconds, args)
    print(f"trained {args.steps} steps in {seconds / 60:.1f} min, final loss "
          f"{sum(losses[-50:]) / len(losses[-50:]):.4f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
