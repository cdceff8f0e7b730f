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
from step3_edge.tasks import (COLOURS, EVAL_SEED, SHAPES, TRAIN_SEED, Example, cell_labels,
                              make_examples, make_training_item, target_text, task_texts)
from step3_edge.tokenizer import (COMPACT_SPECIAL, IM_END, IMAGE_TOKEN, PAD_TOKEN,
                                  build_synthetic_tokenizer, learn_merges)
from step3_edge.vision import project_features

sys.path.insert(0, str(Path(__file__).parent))
from plot import plot_loss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "step3_edge" / "assets" / "default-model"

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


def model_config(vit_layers: int = 2, layers: int = 4) -> Step3Config:
    """Step3 structure at small widths: `layers` decoder layers (the first and last dense, the
    others MoE with 8 experts top-3 and a shared expert), MFA with one K/V head; ViT 728 px /
    patch 14 with both downsamplers."""
    d = _vl({"hidden_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
             "head_dim": 64, "share_q_dim": 128, "intermediate_size": 256,
             "moe_num_experts": 8, "moe_intermediate_size": 64, "share_expert_dim": 64,
             "moe_layers_enum": ",".join(str(i) for i in range(1, layers - 1))},
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
    asked_at: torch.Tensor      # [Q, 2] (row, index) of each question's last prompt token
    asked: torch.Tensor         # [Q, 2] the (colour, shape) a question names (-1: none)

    def to(self, device: torch.device) -> "Packed":
        """The batch with every tensor (image pixels included) on `device`."""
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in vars(self).items()}
        moved["views"] = [dataclasses.replace(v, global_view=v.global_view.to(device),
                                              crops=v.crops.to(device)) for v in self.views]
        return Packed(**moved)


def pack(items: list[list[Example]], proc: Step3Processor, parts: tuple[str, str],
         thoughts: bool = True) -> Packed:
    """Tokenize scenes (each with its questions) into packed rows (see module docstring);
    `parts` is `prompt_parts(proc)`. The targets are `thought</think>answer<|EOT|>`, or
    `</think>answer<|EOT|>` without `thoughts`."""
    im_end = proc.tokenizer.token_to_id(IM_END)
    rows, segs, poss, views = [], [], [], []
    label_rows: list[tuple[int, int, int, int]] = []     # (row, index, label, question)
    aux_rows: list[list[tuple[int, int, int]]] = []      # per row: 169 (colour, shape, object)
    glob_rows: list[list[int]] = []                      # per row: 169 token indices
    q_total = 0
    asked: list[tuple[int, int, int, int]] = []          # per question: row, index, colour, shape
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
            target = proc.encode(target_text(ex.answer, ex.thought if thoughts else ""))
            suffix = ids[p:] + target
            start = len(row)
            row += suffix
            seg += [j + 1] * len(suffix)
            pos += list(range(p, p + len(suffix)))
            first = start + len(ids) - p - 1                 # predicts target[0]
            for k, tok in enumerate(target):
                label_rows.append((b, first + k, tok, q_total))
            asked.append((b, first, *named_in_question(ex)))
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
    q = torch.tensor(asked, dtype=torch.long)                                   # [Q, 4]
    return Packed(ids, positions, mask, lr[:, :2], lr[:, 2], lr[:, 3], views, q_total,
                  torch.tensor(glob_rows, dtype=torch.long), aux[..., 0], aux[..., 1],
                  aux[..., 2], q[:, :2], q[:, 2:])


def named_in_question(ex: Example) -> tuple[int, int]:
    """(colour, shape) indices of what the question names (`Example.named`; -1: none)."""
    colour, kind = ex.named
    return (-1 if colour is None else list(COLOURS).index(colour),
            -1 if kind is None else SHAPES.index(kind))


def image_features(model: Step3ForConditionalGeneration, views: list[ImageViews]
                   ) -> torch.Tensor:
    """Vision features of a batch in token order (per image: crops then global view) [N, h].
    Global views and crops each go through the ViT as one batch."""
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
    return torch.cat(feats)                                                     # [N, h]


def forward_packed(model: Step3ForConditionalGeneration, batch: Packed,
                   vision_grad: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits at every answer-label position [L, vocab] and the residual stream [B, T, h]
    with the image features in it and after each decoder layer (layer `i` at index `i + 1`;
    the global-view tokens of index 0 are the vision side's features). `vision_grad=False`
    runs the vision side without autograd (frozen)."""
    tc = model.config.text_config
    with torch.set_grad_enabled(vision_grad and torch.is_grad_enabled()):
        feats = image_features(model, batch.views)
    x = model.model.embed_tokens(batch.ids)                                     # [B, T, h]
    slots = (batch.ids == model.config.image_token_id).nonzero(as_tuple=True)
    x = x.index_put(slots, feats.to(x.dtype))
    cos, sin = rope_cos_sin(batch.positions, tc.head_dim, tc.rope_theta, tc.rope_factor)
    states = [x]
    for layer in model.model.layers:
        x = layer(x, cos, sin, batch.mask[:, None], None)
        states.append(x)
    h = model.model.norm(x[batch.label_at[:, 0], batch.label_at[:, 1]])        # [L, h]
    return model.lm_head(h).float(), states


def packed_loss(model: Step3ForConditionalGeneration, aux_head: AuxHead, batch: Packed,
                aux_layer: int = 0, vision_grad: bool = True,
                token_head: tuple[int, AuxHead] | None = None, probe_questions: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each question's mean answer-token cross entropy [n_questions], the auxiliary loss on
    the global-view tokens after decoder layer `aux_layer` (-1: on the vision features), and
    the fraction of objects whose shape the probe gets right. The auxiliary loss is the
    colour-or-background CE on every token plus the shape CE of each object on the mean of
    its tokens' shape logits: a token inside a shape sees uniform colour, so per-token shape
    labels are ambiguous and learn far more slowly (train/README.md). `token_head` = (layer,
    head) adds a per-token shape loss (each token labelled with its object's shape) after that
    decoder layer, where attention may have spread an object's shape over its tokens; with
    `probe_questions` the same head also reads, at each question's last prompt token, the
    colour / shape the question names (so the lookup's query and keys share one space)."""
    logits, states = forward_packed(model, batch, vision_grad)
    rows = torch.arange(batch.ids.shape[0], device=batch.ids.device)[:, None]
    glob = states[aux_layer + 1][rows, batch.glob_at]                           # [B, 169, h]
    tok_loss = F.cross_entropy(logits, batch.labels, reduction="none")
    per_q = torch.zeros(batch.n_questions, device=tok_loss.device).index_add_(
        0, batch.question_of, tok_loss)
    count = torch.bincount(batch.question_of, minlength=batch.n_questions).clamp(min=1)
    colour_logits, shape_logits = aux_head(glob.flatten(0, 1))                  # [B*169, .]
    aux = F.cross_entropy(colour_logits.float(), batch.aux_colour.flatten())
    if token_head is not None:
        level, head = token_head
        state = states[level + 1]
        _, token_shape = head(state[rows, batch.glob_at].flatten(0, 1))
        aux = aux + F.cross_entropy(token_shape.float(), batch.aux_shape.flatten(),
                                    ignore_index=-1)
    if token_head is not None and probe_questions:
        q_colour, q_shape = head(state[batch.asked_at[:, 0], batch.asked_at[:, 1]])
        for logit, label in ((q_colour, batch.asked[:, 0]), (q_shape, batch.asked[:, 1])):
            if bool((label >= 0).any()):
                aux = aux + 0.5 * F.cross_entropy(logit.float(), label, ignore_index=-1)
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


@torch.no_grad()
def heldout_accuracy(model: Step3ForConditionalGeneration, proc: Step3Processor,
                     parts: tuple[str, str], n: int, batch: int = 8, thoughts: bool = True
                     ) -> dict[str, float]:
    """Exact-match accuracy per question type on the first `n` held-out examples (EVAL_SEED),
    teacher-forced: a question counts when the argmax at every target position (thought,
    `</think>`, answer) is the target token, which is exactly when greedy decoding writes the
    target (`thoughts`: as stage 2 trains; else as stage 1). A cheap in-training check;
    `step3-edge eval` is the real measure, and counts a wrong thought with a right answer as
    right."""
    was = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    examples = make_examples(EVAL_SEED, n)
    for i in range(0, n, batch):
        chunk = examples[i:i + batch]
        packed = pack([[ex] for ex in chunk], proc, parts, thoughts).to(
            next(model.parameters()).device)
        logits, _ = forward_packed(model, packed)
        right = (logits.argmax(-1) == packed.labels).float()
        wrong = torch.zeros(len(chunk)).index_add_(0, packed.question_of.cpu(),
                                                   1 - right.cpu())
        for ex, w in zip(chunk, wrong.tolist()):
            hits.setdefault(ex.qtype, []).append(w == 0)
    model.train(was)
    acc = {k: sum(v) / len(v) for k, v in hits.items()}
    acc["all"] = sum(sum(v) for v in hits.values()) / n
    return acc


# ---------------------------------------------------------------------------- training
def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))


class Trainer:
    """The training state and one optimisation step. Two stages: until `--freeze-vision-at`
    everything trains (answers + the aux probe); from then on the vision side (ViT,
    downsamplers, projector) is frozen and runs without gradients, every scene is asked the
    colour and shape of each of its shapes, and the LR schedule restarts. The language model
    learns to bind question words to image tokens only once the image features hold still
    (train/README.md); frozen vision also makes a step about three times cheaper. Stage 2
    also trains the short thoughts before `</think>` (`Example.thought`) that turn each
    lookup ("What colour is the triangle?") into one step of attention."""

    def __init__(self, args: argparse.Namespace, merges: list[tuple[str, str]]) -> None:
        torch.manual_seed(args.seed)
        self.args = args
        cfg = model_config(args.vit_layers, args.layers)
        self.proc = compact_processor(cfg, merges)
        self.parts = prompt_parts(self.proc)
        self.model = Step3ForConditionalGeneration(cfg)
        init_weights(self.model, args.seed, args.vit_attn_gain)
        self.aux_head = AuxHead(cfg.text_config.hidden_size)
        self.device = torch.device(args.device)
        self.model.to(self.device).train()
        self.aux_head.to(self.device)
        self.named = [(f"aux.{n}", p) for n, p in self.aux_head.named_parameters()] + \
            list(self.model.named_parameters())
        groups = []
        for vision in (False, True):
            for decay in (True, False):
                params = [p for n, p in self.named
                          if n.startswith(("vision_model", "vit_", "aux.")) == vision
                          and (p.ndim >= 2 and "embed" not in n) == decay]
                groups.append({"params": params, "peak": args.vision_lr if vision else args.lr,
                               "weight_decay": args.weight_decay if decay else 0.0})
        self.opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)
        self.token_head: tuple[int, AuxHead] | None = None
        self.frozen = False
        self.by_type: dict[str, float] = {}

    def add_token_head(self, layer: int) -> None:
        """The per-token shape probe after decoder `layer` (see `packed_loss`), initialised
        from the seed."""
        torch.manual_seed(self.args.seed + 1)
        head = AuxHead(self.model.config.text_config.hidden_size).to(self.device)
        self.token_head = (layer, head)
        self.named += [(f"aux_token.{n}", p) for n, p in head.named_parameters()]
        self.opt.add_param_group({"params": list(head.parameters()), "peak": self.args.lr,
                                  "weight_decay": 0.0})

    def stage(self, step: int) -> tuple[int, int, bool]:
        """(first step, steps, frozen vision) of the stage `step` is in."""
        f = self.args.freeze_vision_at
        if 0 < f < self.args.steps:
            return (f, self.args.steps - f, True) if step >= f else (0, f, False)
        return 0, self.args.steps, False

    def scenes(self, step: int) -> tuple[list[list[Example]], Packed]:
        """Training scenes of `step` (deterministic in seed and step), packed; stage 1 answers
        directly, stage 2 thinks first (`Example.thought`)."""
        every = self.stage(step)[2]
        items = [make_training_item(self.args.seed, step * self.args.batch + i,
                                    self.args.questions, every_shape=every)
                 for i in range(self.args.batch)]
        return items, pack(items, self.proc, self.parts, thoughts=every)

    def freeze_vision(self) -> None:
        """Start stage 2: the vision side stops training (and the per-token probe starts)."""
        for name, p in self.model.named_parameters():
            if name.startswith(("vision_model", "vit_")):
                p.requires_grad_(False)
                p.grad = None
        if self.args.token_shape_layer >= -1:
            self.add_token_head(self.args.token_shape_layer)
        self.frozen = True

    def step(self, step: int, items: list[list[Example]], batch: Packed) -> float:
        """One optimisation step on `batch`; returns the mean answer loss."""
        args = self.args
        start, length, frozen = self.stage(step)
        if frozen and not self.frozen:
            self.freeze_vision()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step - start, length, group["peak"], args.warmup)
        batch = batch.to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            per_q, aux, obj_acc = packed_loss(self.model, self.aux_head, batch, args.aux_layer,
                                              not frozen, self.token_head,
                                              args.probe_questions)
        loss = per_q.mean() + args.aux_weight * aux
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self.named if p.requires_grad], 1.0)
        self.opt.step()
        for ex, lq in zip((e for it in items for e in it), per_q.tolist()):
            self.by_type[ex.qtype] = 0.97 * self.by_type.get(ex.qtype, lq) + 0.03 * lq
        for key, v in (("aux", aux.item()), ("object_shape_acc", obj_acc.item())):
            self.by_type[key] = 0.97 * self.by_type.get(key, v) + 0.03 * v
        return per_q.mean().item()

    def run(self, first: int = 0, last: int | None = None) -> tuple[list[float], float]:
        """Steps `first`..`last` (default: to the end), with a progress bar; the next batch is
        drawn and packed in a thread while a step computes. Returns the losses and seconds."""
        last = self.args.steps if last is None else last
        losses: list[float] = []
        t0 = time.perf_counter()
        bar = tqdm(range(first, last), desc="train", unit="step", dynamic_ncols=True)
        ema = 0.0
        with ThreadPoolExecutor(1) as pool:
            ahead = pool.submit(self.scenes, first)
            for step in bar:
                items, batch = ahead.result()
                if step + 1 < last:
                    ahead = pool.submit(self.scenes, step + 1)
                losses.append(self.step(step, items, batch))
                ema = losses[-1] if step == first else 0.95 * ema + 0.05 * losses[-1]
                bar.set_postfix(loss=f"{ema:.4f}", lr=f"{self.opt.param_groups[0]['lr']:.2e}",
                                stage=2 if self.frozen else 1)
                if self.args.log_every and (step + 1) % self.args.log_every == 0:
                    tqdm.write(f"step {step + 1} loss {ema:.4f} " + " ".join(
                        f"{k}={v:.3f}" for k, v in sorted(self.by_type.items())))
                if self.args.eval_every and (step + 1) % self.args.eval_every == 0:
                    acc = heldout_accuracy(self.model, self.proc, self.parts, self.args.eval_n,
                                           thoughts=self.frozen)
                    tqdm.write(f"step {step + 1} held-out accuracy " + " ".join(
                        f"{k}={v:.2f}" for k, v in sorted(acc.items())))
        return losses, time.perf_counter() - t0


def train(args: argparse.Namespace, merges: list[tuple[str, str]]
          ) -> tuple[Step3ForConditionalGeneration, list[float], float]:
    trainer = Trainer(args, merges)
    losses, seconds = trainer.run()
    return trainer.model.cpu().eval(), losses, seconds


def _shown(path: Path) -> str:
    """`path` relative to the repository when inside it (no local paths in shipped files)."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


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
            "threads": torch.get_num_threads(), "answer_format": "{thought}</think>{answer}<|EOT|>",
            "command": " ".join(sys.argv),
            "args": {k: _shown(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
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
    p.add_argument("--layers", type=int, default=4, help="decoder layers (>= 3)")
    p.add_argument("--vit-attn-gain", type=float, default=0.0,
                   help="initial weight of the ViT post-attention LayerNorm")
    p.add_argument("--aux-weight", type=float, default=3.0,
                   help="weight of the image-token colour / object-shape loss (0 = off)")
    p.add_argument("--aux-layer", type=int, default=0,
                   help="decoder layer after which the aux probe reads (-1: vision features)")
    p.add_argument("--token-shape-layer", type=int, default=1,
                   help="stage 2: a per-token shape probe (and what each question names) after "
                        "this decoder layer (-2 = off)")
    p.add_argument("--probe-questions", action="store_true",
                   help="stage 2: the per-token probe also reads what each question names")
    p.add_argument("--freeze-vision-at", type=int, default=1400,
                   help="step from which the vision side is frozen and the answers train at a "
                        "restarted LR (0 = never)")
    p.add_argument("--eval-every", type=int, default=500,
                   help="print teacher-forced held-out accuracy every N steps (0 = never)")
    p.add_argument("--eval-n", type=int, default=60, help="held-out examples for --eval-every")
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
