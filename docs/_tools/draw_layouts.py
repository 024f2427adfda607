"""Draws the layout pictures of docs/layouts.md into docs/img/*.svg.

The SVGs are plain, hand-editable files
this script only keeps their sizes and colours
consistent. Run ``python docs/_tools/draw_layouts.py`` after editing it, and check the result with
``rsvg-convert docs/img/NAME.svg -o /tmp/NAME.png``.
"""
import html

FONT = "font-family=\"'DejaVu Sans', Helvetica, Arial, sans-serif\""
MONO = "font-family=\"'DejaVu Sans Mono', Menlo, Consolas, monospace\""
COL = {
    "Q": ("#4C78A8", "#ffffff"), "K": ("#F58518", "#ffffff"), "V": ("#54A24B", "#ffffff"),
    "g": ("#B279A2", "#ffffff"), "u": ("#72B7B2", "#ffffff"), "d": ("#9D9D9D", "#ffffff"),
    "n": ("#EECA3B", "#333333"), "o": ("#9D9D9D", "#ffffff"),
}


class SVG:
    def __init__(self, w, h, title):
        self.w, self.h = w, h
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                      f'viewBox="0 0 {w} {h}" role="img" aria-label="{html.escape(title)}">',
                      f"<title>{html.escape(title)}</title>",
                      f'<rect x="0" y="0" width="{w}" height="{h}" fill="#ffffff"/>']

    def text(self, x, y, s, size=13, anchor="start", weight="normal", color="#222222", mono=False, italic=False):
        fam = MONO if mono else FONT
        style = ' font-style="italic"' if italic else ""
        self.parts.append(f'<text x="{x}" y="{y}" {fam} font-size="{size}" text-anchor="{anchor}" '
                          f'font-weight="{weight}" fill="{color}"{style}>{html.escape(s)}</text>')

    def rect(self, x, y, w, h, fill, stroke="#ffffff", sw=1.5, rx=3, dash=None, opacity=None):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        o = f' fill-opacity="{opacity}"' if opacity is not None else ""
        self.parts.append(f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="{rx}" fill="{fill}"{o} '
                          f'stroke="{stroke}" stroke-width="{sw}"{d}/>')

    def line(self, x1, y1, x2, y2, color="#444444", sw=1.5, dash=None, arrow=False):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        a = ' marker-end="url(#arrow)"' if arrow else ""
        self.parts.append(f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="{color}" '
                          f'stroke-width="{sw}"{d}{a}/>')

    def path(self, d, color="#444444", sw=1.5, arrow=False, dash=None):
        a = ' marker-end="url(#arrow)"' if arrow else ""
        ds = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-width="{sw}"{a}{ds}/>')

    def defs(self):
        self.parts.append('<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
                          'markerHeight="7" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
                          'fill="#444444"/></marker></defs>')

    def block(self, x, y, w, h, kind, label, sub=None):
        fill, fg = COL[kind]
        self.rect(x, y, w, h, fill)
        self.text(x + w / 2, y + h / 2 + (0 if sub else 5), label, 13, "middle", "bold", fg)
        if sub:
            self.text(x + w / 2, y + h / 2 + 14, sub, 10, "middle", "normal", fg)

    def brace(self, x1, x2, y, label, up=True, color="#444444", size=12):
        t = -8 if up else 8
        self.path(f"M{x1},{y} L{x1},{y + t} L{x2},{y + t} L{x2},{y}", color, 1.2)
        self.text((x1 + x2) / 2, y + t + (-5 if up else 16), label, size, "middle", color=color)

    def save(self, path):
        self.parts.append("</svg>")
        with open(path, "w") as f:
            f.write("\n".join(self.parts) + "\n")


def strip(s, x, y, blocks, bw=46, bh=34, gap_after=()):
    """blocks: list of (kind, label, sub); returns list of x positions."""
    xs = []
    for i, (kind, label, sub) in enumerate(blocks):
        s.block(x, y, bw, bh, kind, label, sub)
        xs.append(x)
        x += bw + (10 if i in gap_after else 0)
    return xs


def rank_band(s, x, y, w, h, label, fill):
    s.rect(x, y, w, h, fill, stroke="none", sw=0, rx=6)
    s.text(x + 8, y + 16, label, 12, weight="bold", color="#333333")


def qkv():
    H, KV = 8, 4
    G = H // KV
    bw, bh = 46, 34
    s = SVG(960, 636, "Interleaved QKV layout of the torch backend and how a dim-0 shard over tp=2 splits it")
    s.defs()
    s.text(20, 30, "QKV projection: num_heads = 8, num_kv_heads = 4 (2 query heads per KV head); "
                   "one block = head_dim rows", 15, weight="bold")
    # legend
    lx = 20
    for kind, name in (("Q", "query head"), ("K", "key head"), ("V", "value head")):
        s.rect(lx, 44, 16, 16, COL[kind][0])
        s.text(lx + 22, 57, name, 12)
        lx += 120
    s.text(lx + 10, 57, "Q3 = query head 3;  g1 = KV group 1 (the KV head that query head reads)", 12, color="#555555")

    # 1. Hugging Face
    y = 100
    s.text(20, y - 12, "1. Hugging Face checkpoint (canonical): three tensors", 14, weight="bold")
    x = 20
    q = [("Q", f"Q{i}", f"g{i // G}") for i in range(H)]
    s.text(x, y + bh + 18, "self_attn.q_proj.weight", 12, mono=True)
    strip(s, x, y, q, bw, bh)
    x2 = x + H * bw + 24
    s.text(x2, y + bh + 18, "k_proj.weight", 12, mono=True)
    strip(s, x2, y, [("K", f"K{i}", f"g{i}") for i in range(KV)], bw, bh)
    x3 = x2 + KV * bw + 24
    s.text(x3, y + bh + 18, "v_proj.weight", 12, mono=True)
    strip(s, x3, y, [("V", f"V{i}", f"g{i}") for i in range(KV)], bw, bh)
    s.text(940, y + bh + 18, "dim 0 →", 12, "end", color="#555555")

    # arrow
    s.line(480, y + bh + 30, 480, y + bh + 62, arrow=True)
    s.text(492, y + bh + 52, "InterleaveQKV (crosschip.weights.layouts.interleave_qkv)", 12, mono=True, color="#444444")

    # 2. torch combined
    y = 250
    s.text(20, y - 30, "2. torch backend: self_attn.qkv_proj.weight = [Q_g0 | K_0 | V_0 | Q_g1 | K_1 | V_1 | …]",
           14, weight="bold")
    blocks = []
    for g in range(KV):
        blocks += [("Q", f"Q{g * G + j}", f"g{g}") for j in range(G)]
        blocks += [("K", f"K{g}", f"g{g}"), ("V", f"V{g}", f"g{g}")]
    per = G + 2
    gaps = tuple(per * (g + 1) - 1 for g in range(KV - 1))
    x0 = 20
    xs = strip(s, x0, y, blocks, bw, bh, gaps)
    for g in range(KV):
        a, b = xs[g * per], xs[g * per + per - 1] + bw
        s.brace(a, b, y - 2, f"group {g}", up=True)

    # 3. sharded
    s.line(480, 290, 480, 316, arrow=True)
    s.text(492, 308, "cut dim 0 into tp equal slices", 12, color="#444444")
    y = 366
    s.text(20, y - 22, "3. Column-parallel shard on dim 0, tp = 2: every rank holds whole KV groups", 14, weight="bold")
    half = KV // 2 * per
    rank_band(s, 14, y, 2 * per * bw + 24, 92, "rank 0", "#E8EEF7")
    strip(s, 24, y + 24, blocks[:half], bw, bh, (per - 1,))
    s.text(24, y + 80, "query heads 0–3 with their KV heads 0, 1", 12, color="#333333")
    x1 = 14 + 2 * per * bw + 24 + 20
    rank_band(s, x1, y, 2 * per * bw + 24, 92, "rank 1", "#EAF4E6")
    strip(s, x1 + 10, y + 24, blocks[half:], bw, bh, (per - 1,))
    s.text(x1 + 10, y + 80, "query heads 4–7 with their KV heads 2, 3", 12, color="#333333")

    # 4. counter-example
    y = 512
    s.text(20, y - 22, "Why not plain [Q; K; V]? The same cut would give rank 0 only queries and rank 1 only keys "
                       "and values:", 14, weight="bold", color="#9B1C1C")
    plain = q + [("K", f"K{i}", f"g{i}") for i in range(KV)] + [("V", f"V{i}", f"g{i}") for i in range(KV)]
    xs = strip(s, 20, y, plain, bw, bh)
    mid = xs[8] - 0
    s.line(mid, y - 8, mid, y + bh + 8, "#C62828", 2.5, dash="6,4")
    s.text(20 + 4 * bw, y + bh + 22, "rank 0: no K, no V", 12, "middle", color="#C62828")
    s.text(20 + 12 * bw, y + bh + 22, "rank 1: no Q", 12, "middle", color="#C62828")
    s.text(20, 618, "The split into q, k, v reads each group's rows back (split_qkv), so a round trip "
                    "canonical → torch → canonical is bitwise identical.", 12, color="#555555")
    s.save("qkv-interleave.svg")


def gate_up():
    rows = 8
    bw, bh = 46, 34
    s = SVG(960, 590, "Row-interleaved gate_up layout of the torch backend and how a dim-0 shard over tp=2 splits it")
    s.defs()
    s.text(20, 30, "Gated MLP: intermediate_size = 8 (one block = one row of hidden_size weights)", 15, weight="bold")
    lx = 20
    for kind, name in (("g", "gate row"), ("u", "up row")):
        s.rect(lx, 44, 16, 16, COL[kind][0])
        s.text(lx + 22, 57, name, 12)
        lx += 110
    s.text(lx + 10, 57, "act(gate_i) · up_i feeds column i of down_proj", 12, color="#555555")

    y = 100
    s.text(20, y - 12, "1. Hugging Face checkpoint (canonical)", 14, weight="bold")
    strip(s, 20, y, [("g", f"g{i}", None) for i in range(rows)], bw, bh)
    s.text(20, y + bh + 18, "mlp.gate_proj.weight", 12, mono=True)
    x2 = 20 + rows * bw + 24
    strip(s, x2, y, [("u", f"u{i}", None) for i in range(rows)], bw, bh)
    s.text(x2, y + bh + 18, "mlp.up_proj.weight", 12, mono=True)
    s.text(940, y + bh + 18, "dim 0 →", 12, "end", color="#555555")
    s.line(480, y + bh + 30, 480, y + bh + 62, arrow=True)
    s.text(492, y + bh + 52, "InterleaveRows (crosschip.weights.layouts.interleave_rows)", 12, mono=True, color="#444444")

    y = 240
    s.text(20, y - 14, "2. torch backend: mlp.gate_up_proj.weight = [gate_0, up_0, gate_1, up_1, …]", 14, weight="bold")
    blocks = []
    for i in range(rows):
        blocks += [("g", f"g{i}", None), ("u", f"u{i}", None)]
    strip(s, 20, y, blocks, bw, bh, tuple(range(1, 2 * rows - 1, 2)))
    s.text(20, y + bh + 18, "forward: unflatten(-1, (-1, 2)) → pairs[..., 0] = gate, pairs[..., 1] = up", 12,
           mono=True, color="#444444")

    y = 350
    s.text(20, y - 8, "3. Column-parallel shard on dim 0, tp = 2: every rank holds matching gate/up pairs", 14,
           weight="bold")
    w = 8 * bw + 3 * 10 + 20
    rank_band(s, 14, y + 12, w, 88, "rank 0", "#F3EAF1")
    strip(s, 24, y + 36, blocks[:8], bw, bh, (1, 3, 5))
    s.text(24, y + 92, "intermediate rows 0–3 (down_proj columns 0–3)", 12, color="#333333")
    rank_band(s, 14 + w + 20, y + 12, w, 88, "rank 1", "#E7F4F3")
    strip(s, 24 + w + 20, y + 36, blocks[8:], bw, bh, (1, 3, 5))
    s.text(24 + w + 20, y + 92, "intermediate rows 4–7 (down_proj columns 4–7)", 12, color="#333333")

    y = 500
    s.text(20, y - 14, "Why not [gate; up] halves (te's fc1 layout)? The same cut gives rank 0 only gate rows:", 14,
           weight="bold", color="#9B1C1C")
    halves = [("g", f"g{i}", None) for i in range(rows)] + [("u", f"u{i}", None) for i in range(rows)]
    xs = strip(s, 20, y, halves, bw, bh)
    s.line(xs[8], y - 8, xs[8], y + bh + 8, "#C62828", 2.5, dash="6,4")
    s.text(20 + 4 * bw, y + bh + 22, "rank 0: no up rows", 12, "middle", color="#C62828")
    s.text(20 + 12 * bw, y + bh + 22, "rank 1: no gate rows", 12, "middle", color="#C62828")
    s.save("gate-up-interleave.svg")


def te_layout():
    s = SVG(960, 600, "Physical layout of the te backend: Transformer Engine modules and the Hugging Face "
                      "keys they hold")
    s.defs()
    s.text(20, 30, "te backend: one decoder layer (prefix model.layers.N)", 15, weight="bold")
    s.text(20, 66, "Hugging Face keys (canonical)", 13, weight="bold")
    s.text(520, 66, "te modules and parameters (physical, model.state_dict())", 13, weight="bold")
    left = [
        ("n", "input_layernorm.weight", 100), ("Q", "self_attn.q_proj.weight", 140),
        ("K", "self_attn.k_proj.weight", 180), ("V", "self_attn.v_proj.weight", 220),
        ("o", "self_attn.o_proj.weight", 290),
        ("n", "post_attention_layernorm.weight", 360), ("g", "mlp.gate_proj.weight", 400),
        ("u", "mlp.up_proj.weight", 440), ("d", "mlp.down_proj.weight", 480),
    ]
    for kind, name, y in left:
        fill, fg = COL[kind]
        s.rect(20, y, 300, 30, fill)
        s.text(30, y + 20, name, 12, color=fg, mono=True)

    # right: QKV module box
    bx = 520
    s.rect(bx, 86, 420, 176, "#F4F6FA", stroke="#8A9BB8", sw=1.2, rx=6)
    s.text(bx + 10, 106, "self_attn.qkv_proj.proj: te.LayerNormLinear", 12, weight="bold", mono=True)
    s.rect(bx + 10, 116, 400, 30, COL["n"][0])
    s.text(bx + 20, 136, "layer_norm_weight (RMSNorm, fused)", 12, mono=True, color="#333333")
    s.text(bx + 10, 172, "weight = [Q_g0 | K_0 | V_0 | Q_g1 | K_1 | V_1 | …]", 12, mono=True)
    x = bx + 10
    for g in range(3):
        for kind, lab in (("Q", "Q"), ("Q", "Q"), ("K", "K"), ("V", "V")):
            s.block(x, 182, 30, 28, kind, lab)
            x += 30
        x += 6
    s.text(x + 4, 202, "…", 14)
    s.text(bx + 10, 232, "same grouped order as the torch backend", 11, color="#555555", italic=True)
    s.text(bx + 10, 250, "(bias: proj.bias, same order)", 11, color="#555555", italic=True)

    s.rect(bx, 276, 420, 44, "#F4F6FA", stroke="#8A9BB8", sw=1.2, rx=6)
    s.text(bx + 10, 293, "self_attn.o_proj.proj: te.Linear", 12, weight="bold", mono=True)
    s.text(bx + 10, 312, "weight", 12, mono=True)

    s.rect(bx, 334, 420, 176, "#F4F6FA", stroke="#8A9BB8", sw=1.2, rx=6)
    s.text(bx + 10, 354, "mlp.mlp: te.LayerNormMLP (SwiGLU)", 12, weight="bold", mono=True)
    s.rect(bx + 10, 364, 400, 30, COL["n"][0])
    s.text(bx + 20, 384, "layer_norm_weight (RMSNorm, fused)", 12, mono=True, color="#333333")
    s.text(bx + 10, 418, "fc1_weight = [gate; up]: two halves of I rows", 12, mono=True)
    x = bx + 10
    for kind in ("g", "u"):
        for lab in (f"{kind}0", f"{kind}1", "…", f"{kind}I-1"):
            s.block(x, 426, 44, 28, kind, lab)
            x += 44
        x += 12
    s.rect(bx + 10, 466, 400, 30, COL["d"][0])
    s.text(bx + 20, 486, "fc2_weight", 12, mono=True, color="#ffffff")

    # arrows
    def arrow(y1, y2):
        s.path(f"M322,{y1} C420,{y1} 420,{y2} {bx - 4},{y2}", "#666666", 1.3, arrow=True)
    arrow(115, 131)
    for y in (155, 195, 235):
        arrow(y, 196)
    arrow(305, 312)
    arrow(375, 379)
    arrow(415, 440)
    arrow(455, 440)
    arrow(495, 481)

    s.text(20, 546, "input_layernorm and post_attention_layernorm are nn.Identity() in the model: the norm "
                    "runs inside the projection (runtime.input_norm).", 12, color="#444444")
    s.text(20, 566, "The final model.norm (rms_norm) holds norm.weight (te.RMSNorm). Parameter keys ending "
                    "in _extra_state", 12, color="#444444")
    s.text(20, 584, "(FP8 scaling metadata) are module state, not weights: they have no Hugging Face key and "
                    "are never saved to a checkpoint.", 12, color="#444444")
    s.save("te-layout.svg")


def names():
    s = SVG(960, 300, "The three names of a weight: Hugging Face key, component role, physical parameter")
    s.defs()
    s.text(20, 30, "Three names of one weight, and who maps between them", 15, weight="bold")
    boxes = [
        (20, "Hugging Face key", ["model.layers.0.self_attn", ".q_proj.weight"], "checkpoint, save_pretrained"),
        (350, "role", ["q.weight", "of the qkv_projection at", "model.layers.0.self_attn.qkv_proj"],
         "the same for every backend"),
        (680, "physical name", ["reference: q_proj.weight", "torch: weight (rows of Q)", "te: proj.weight (rows of Q)"],
         "model.state_dict()"),
    ]
    for x, head, lines, foot in boxes:
        s.rect(x, 60, 260, 130, "#F4F6FA", stroke="#8A9BB8", sw=1.2, rx=8)
        s.text(x + 130, 84, head, 14, "middle", "bold")
        for i, line in enumerate(lines):
            s.text(x + 130, 112 + i * 20, line, 12, "middle", mono=True)
        s.text(x + 130, 210, foot, 12, "middle", color="#555555", italic=True)
    s.line(284, 110, 346, 110, arrow=True)
    s.line(346, 140, 284, 140, arrow=True)
    s.line(614, 110, 676, 110, arrow=True)
    s.line(676, 140, 614, 140, arrow=True)
    s.text(315, 240, "the model:", 12, "middle", weight="bold")
    s.text(315, 258, "checkpoint_names()", 12, "middle", mono=True)
    s.text(315, 276, "checkpoint_transform()", 12, "middle", mono=True)
    s.text(645, 240, "the backend:", 12, "middle", weight="bold")
    s.text(645, 258, "LayoutImpl → Transform", 12, "middle", mono=True)
    s.text(645, 276, "apply / invert", 12, "middle", mono=True)
    s.save("weight-names.svg")



def kv_replication():
    H, KV, TP = 8, 2, 4
    bw, bh = 46, 34
    s = SVG(960, 360, "KV-head replication when the tensor-parallel degree exceeds the KV heads")
    s.defs()
    s.text(20, 30, "tp = 4 > num_kv_heads = 2: each KV head is stored once per rank that needs it "
                   "(num_heads = 8)", 15, weight="bold")
    y = 80
    s.text(20, y - 12, "1. Hugging Face: 2 KV heads, each read by 4 query heads", 14, weight="bold")
    strip(s, 20, y, [("Q", f"Q{i}", f"g{i // 4}") for i in range(H)], bw, bh)
    x2 = 20 + H * bw + 24
    strip(s, x2, y, [("K", f"K{i}", f"g{i}") for i in range(KV)], bw, bh)
    x3 = x2 + KV * bw + 24
    strip(s, x3, y, [("V", f"V{i}", f"g{i}") for i in range(KV)], bw, bh)
    s.line(300, y + bh + 10, 300, y + bh + 40, arrow=True)
    s.text(312, y + bh + 32, "ReplicateHeads (k, v: 2 copies), then InterleaveQKV (4 groups)", 12,
           mono=True, color="#444444")
    y = 200
    s.text(20, y - 22, "2. torch backend at tp = 4: K0/V0 and K1/V1 appear twice; 2 query heads per group",
           14, weight="bold")
    blocks = []
    for g in range(TP):
        kv = g // 2
        blocks += [("Q", f"Q{2 * g}", f"g{kv}"), ("Q", f"Q{2 * g + 1}", f"g{kv}"),
                   ("K", f"K{kv}", "copy"), ("V", f"V{kv}", "copy")]
    per = 4
    fills = ["#E8EEF7", "#EAF4E6", "#F3EAF1", "#FFF4E0"]
    x = 14
    for r in range(TP):
        w = per * bw + 20
        rank_band(s, x, y, w, 72, f"rank {r}", fills[r])
        strip(s, x + 10, y + 24, blocks[r * per:(r + 1) * per], bw, bh)
        x += w + 14
    s.text(20, y + 100, "Each rank again holds whole groups: its query heads and a replica of the "
                        "KV head they read.", 12, color="#333333")
    s.text(20, y + 122, "Saving keeps the first replica of each KV head (first_replica), so the "
                        "checkpoint is the canonical one;", 12, color="#333333")
    s.text(20, y + 140, "in training, the torch backend sums the replicas' gradients so the "
                        "copies stay equal.", 12, color="#333333")
    s.save("kv-replication.svg")


def neuron_layout():
    bw, bh = 46, 34
    s = SVG(960, 514, "Physical QKV layout of the neuron backend at tp = 4 with 2 KV heads, on trn1 and trn2")
    s.defs()
    s.text(20, 30, "neuron backend at tp = 4 > num_kv_heads = 2: NxD's fused weight_qkv, rank by rank, "
                   "on each platform", 15, weight="bold")
    y = 80
    s.text(20, y - 12, "1. Hugging Face (canonical): num_heads = 8, num_kv_heads = 2", 14, weight="bold")
    strip(s, 20, y, [("Q", f"Q{i}", f"g{i // 4}") for i in range(8)], bw, bh)
    x2 = 20 + 8 * bw + 24
    strip(s, x2, y, [("K", f"K{i}", f"g{i}") for i in range(2)], bw, bh)
    strip(s, x2 + 2 * bw + 24, y, [("V", f"V{i}", f"g{i}") for i in range(2)], bw, bh)
    s.text(940, y + bh + 18, "kv_size_multiplier = 2: each KV head stored twice", 12, "end", color="#555555")

    rows = [  # (title, per rank: (first query head, KV head))
        ("2. trn1: tiled KV replicas (NxD's KV-shared groups {0, 2} and {1, 3})", [(0, 0), (4, 1), (2, 0), (6, 1)]),
        ("3. trn2: adjacent KV replicas (groups {0, 1} and {2, 3})", [(0, 0), (2, 0), (4, 1), (6, 1)]),
    ]
    fills = ["#E8EEF7", "#EAF4E6", "#F3EAF1", "#FFF4E0"]
    y = 190
    for title, ranks in rows:
        s.text(20, y - 22, title, 14, weight="bold")
        s.text(940, y - 22, "weight_qkv shard = [Q_r; K_r; V_r]", 12, "end", color="#555555", mono=True)
        seen, x = set(), 14
        for r, (q, kv) in enumerate(ranks):
            sub = "copy" if kv in seen else f"g{kv}"
            seen.add(kv)
            blocks = [("Q", f"Q{q}", f"g{kv}"), ("Q", f"Q{q + 1}", f"g{kv}"),
                      ("K", f"K{kv}", sub), ("V", f"V{kv}", sub)]
            w = 4 * bw + 10 + 20
            rank_band(s, x, y, w, 72, f"rank {r}", fills[r])
            strip(s, x + 10, y + 24, blocks, bw, bh, (1,))
            x += w + 14
        y += 120
    y -= 22
    for line in (
        "NxD sums a KV head's gradients over the ranks of its KV-shared group; the layout puts that head on",
        "exactly those ranks (read from NxD's arrange_kv_groups for the platform).",
        "Query heads follow their KV head (on trn1 they are permuted), and o_proj's input columns follow the "
        "query heads.",
        "Weights laid out for the other platform compute the same forward but wrong K/V gradients; saving keeps",
        "the first copy, so the checkpoint is canonical.",
        "gate_up_proj (ColumnParallelLinear, stride=2): rank r holds [gate rows of r; up rows of r].",
    ):
        s.text(20, y, line, 12, color="#333333")
        y += 18
    s.save("neuron-layout.svg")


def nxd_checkpoint():
    """An NxD sharded checkpoint (tp = 4, 8 query heads, 2 KV heads, tiled) and how consolidation
    maps its rank files back to the Hugging Face weights."""
    bw, bh = 34, 32
    s = SVG(1040, 660, "How an NxD sharded checkpoint at tp = 4 maps to Hugging Face weights")
    s.defs()
    s.text(20, 30, "An NxD sharded checkpoint (tp = 4, 8 query heads, 2 KV heads) and its Hugging Face weights",
           15, weight="bold")
    tree = [(0, "model-dir/", "Optimum Neuron's save_pretrained (crosschip convert writes the same)"),
            (1, "config.json", ""),
            (1, "shards/", "the tag"),
            (2, "checkpoint, done", "written first, and once every rank has finished"),
            (2, "mp_metadata_pp_rank_0.json", "per parameter: partition_dim, partition_stride, num_partitions;"),
            (2, "", "per module: FusedLinearsSpec, GQAQKVColumnParallelLinearSpec"),
            (2, "model/dp_rank_00_tp_rank_0R_pp_rank_00.pt", "one per tp rank (xser: a .pt.tensors/ folder beside)"),
            (2, "optim/dp_rank_00_tp_rank_0R_pp_rank_00.pt", "the optimizer state of rank R")]
    y = 62
    for depth, name, note in tree:
        s.text(30 + 22 * depth, y, name, 12, mono=True, color="#222222")
        s.text(470, y, note, 12, color="#555555")
        y += 18
    y = 262
    s.text(20, y - 26, "Rank files: rank r holds qkv_proj.weight_qkv = [its Q heads; one K copy; one V copy] "
                       "and gate_up_proj.weight = [gate_r; up_r]", 13, weight="bold")
    fills = ["#E8EEF7", "#EAF4E6", "#F3EAF1", "#FFF4E0"]
    ranks = [(0, 0), (4, 1), (2, 0), (6, 1)]  # tiled: rank r holds KV head r mod 2
    x = 14
    starts = []
    for r, (q, kv) in enumerate(ranks):
        w = 6 * bw + 2 * 10 + 20
        rank_band(s, x, y, w, 70, f"rank {r}", fills[r])
        sub = "copy" if r >= 2 else f"g{kv}"
        strip(s, x + 10, y + 26, [("Q", f"Q{q}", f"g{kv}"), ("Q", f"Q{q + 1}", f"g{kv}"), ("K", f"K{kv}", sub),
                                   ("V", f"V{kv}", sub), ("g", f"G{r}", "gate"), ("u", f"U{r}", "up")],
              bw, bh, (3,))
        starts.append(x + 10)
        x += w + 14
    y = 440
    s.text(20, y - 52, "Consolidated (Hugging Face): every transform reversed, bit for bit", 13, weight="bold")
    s.text(20, y - 22, "q_proj: query heads put back in order", 12, color="#333333")
    strip(s, 20, y, [("Q", f"Q{i}", f"g{i // 4}") for i in range(8)], bw, bh)
    s.text(330, y - 30, "k_proj, v_proj: the first copy", 12, color="#333333")
    s.text(330, y - 14, "of each head (the others checked equal)", 12, color="#333333")
    strip(s, 330, y, [("K", "K0", "g0"), ("K", "K1", "g1")], bw, bh)
    strip(s, 330 + 2 * bw + 14, y, [("V", "V0", "g0"), ("V", "V1", "g1")], bw, bh)
    s.text(620, y - 22, "gate_proj, up_proj: the stride-2 blocks split", 12, color="#333333")
    strip(s, 620, y, [("g", f"G{i}", "gate") for i in range(4)], bw, bh)
    strip(s, 620 + 4 * bw + 14, y, [("u", f"U{i}", "up") for i in range(4)], bw, bh)
    for r, x0 in enumerate(starts):  # rank r's query heads into their canonical places
        q = ranks[r][0]
        for i in range(2):
            s.line(x0 + i * bw + bw / 2, 262 + 58, 20 + (q + i) * bw + bw / 2, y - 2, "#4C78A8", 1, arrow=True)
    y += 70
    for line in (
        "o_proj (row-parallel): the rank shards concatenated along its input columns, which then follow the query "
        "heads back into order.",
        "Embedding and lm_head: vocab-parallel, concatenated along dim 0. Norms: replicated, taken from rank 0.",
        "Optimum Neuron tiles the KV copies (NxD's grouping on trn1); crosschip on trn2 keeps a head's copies on "
        "adjacent ranks, queries in order,",
        "and marks that spec kv_layout: interleave. Without the metadata, --config and --kv-layout say the same; "
        "a wrong layout compares copies",
        "of different heads, and consolidation stops before anything is written.",
    ):
        s.text(20, y, line, 12, color="#333333")
        y += 18
    s.save("nxd-checkpoint.svg")


if __name__ == "__main__":
    import os
    import sys

    # Writes into the directory given (default: docs/img next to this script's parent).
    os.chdir(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "img"))
    qkv()
    gate_up()
    te_layout()
    names()
    kv_replication()
    neuron_layout()
    nxd_checkpoint()
