"""The single-component hand-ins of ``handins.py``: per component, correct variants written
differently from the solutions, and common mistakes (with what they should cost).

Mistakes in a component that later components build on (GELU, LayerNorm, the block, the
batch loss, the sampling probabilities, the LoRA layer and wrapper, the attention steps)
are the isolation cases: they must cost their own points only.
"""
from __future__ import annotations

from .handins import Handin


def _h(assignment: str, component: str, label: str, source: str, *lose: str) -> Handin:
    return Handin(assignment, f"{component}_solution", label, source.strip("\n") + "\n", tuple(lose))


HANDINS: list[Handin] = []
add = HANDINS.append

# --- ch02 --------------------------------------------------------------------------------
TOKENIZER = '''
class SimpleTokenizer:
    def __init__(self, vocab):
        self.str_to_int = vocab
        self.int_to_str = {{i: s for s, i in vocab.items()}}

    def encode(self, text):
        unk = self.str_to_int["<|unk|>"]
        out = []
        for piece in re.split(SPLIT_PATTERN, text):
            piece = piece.strip()
            if piece:
                out.append(self.str_to_int[piece] if piece in self.str_to_int else unk)
        return out

    def decode(self, ids):
        text = " ".join(self.int_to_str[i] for i in ids)
        return {decode}
'''
add(_h("ch02", "ch02_tokenizer", "decode with every punctuation mark of SPLIT_PATTERN",
       TOKENIZER.format(decode="re.sub(r'\\s+([,.:;?_!\"()\\'])', r'\\1', text)")))
add(_h("ch02", "ch02_tokenizer", "decode keeps the spaces before punctuation", TOKENIZER.format(decode="text"),
       "ch02_tokenizer"))
add(_h("ch02", "ch02_tokenizer", "decode handles only , . ? ! \" ( ) '",
       TOKENIZER.format(decode="re.sub(r'\\s+([,.?!\"()\\'])', r'\\1', text)"), "ch02_tokenizer"))
WINDOWS = '''
class SlidingWindowDataset(Dataset):
    def __init__(self, text, tokenizer, max_length, stride):
        ids = torch.tensor(tokenizer.encode(text, allowed_special={{"<|endoftext|>"}}))
        starts = range(0, len(ids) - max_length, stride)
        self.pairs = [(ids[s : s + max_length], ids[s + {shift} : s + max_length + {shift}]) for s in starts]

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        return self.pairs[i]
'''
add(_h("ch02", "ch02_sliding_window", "pairs of tensor slices", WINDOWS.format(shift=1)))
add(_h("ch02", "ch02_sliding_window", "targets not shifted", WINDOWS.format(shift=0), "ch02_sliding_window"))
add(_h("ch02", "ch02_embeddings", "position table sliced", '''
def embed_tokens(token_ids, tok_emb, pos_emb):
    return tok_emb.weight[token_ids] + pos_emb.weight[: token_ids.shape[1]]
'''))
add(_h("ch02", "ch02_embeddings", "no position embeddings", '''
def embed_tokens(token_ids, tok_emb, pos_emb):
    return tok_emb(token_ids)
''', "ch02_embeddings"))

# --- ch03 --------------------------------------------------------------------------------
add(_h("ch03", "ch03_attention_scores", "einsum", '''
def attention_scores(queries, keys):
    return torch.einsum("...qd,...kd->...qk", queries, keys)
'''))
add(_h("ch03", "ch03_attention_scores", "keys times queries", '''
def attention_scores(queries, keys):
    return keys @ queries.transpose(-2, -1)
''', "ch03_attention_scores"))
add(_h("ch03", "ch03_attention_weights", "softmax by hand, stabilised", '''
def attention_weights(scores, d_k):
    z = scores / math.sqrt(d_k)
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)
'''))
add(_h("ch03", "ch03_attention_weights", "not scaled by sqrt(d_k) (used by every module)", '''
def attention_weights(scores, d_k):
    return torch.softmax(scores, dim=-1)
''', "ch03_attention_weights"))
add(_h("ch03", "ch03_context_vectors", "einsum", '''
def context_vectors(weights, values):
    return torch.einsum("...qk,...kd->...qd", weights, values)
'''))
add(_h("ch03", "ch03_context_vectors", "weights transposed (used by every module)", '''
def context_vectors(weights, values):
    return weights.transpose(-2, -1) @ values
''', "ch03_context_vectors"))
add(_h("ch03", "ch03_self_attention", "explicit softmax, no helper functions", '''
class SelfAttention(nn.Module):
    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def forward(self, x):
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        return torch.softmax(q @ k.transpose(-2, -1) / k.shape[-1] ** 0.5, dim=-1) @ v
'''))
add(_h("ch03", "ch03_self_attention", "scaled by sqrt(d_in)", '''
class SelfAttention(nn.Module):
    def __init__(self, d_in, d_out, qkv_bias=False):
        super().__init__()
        self.d_in = d_in
        self.W_query, self.W_key, self.W_value = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))

    def forward(self, x):
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        return context_vectors(attention_weights(attention_scores(q, k), self.d_in), v)
''', "ch03_self_attention"))
CAUSAL = '''
class CausalAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, qkv_bias=False):
        super().__init__()
        self.W_query, self.W_key, self.W_value = (nn.Linear(d_in, d_out, bias=qkv_bias) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.context_length = context_length
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1).bool())

    def forward(self, x):
        t = x.shape[1]
        if t > self.context_length:
            raise ValueError("too long")
        q, k, v = self.W_query(x), self.W_key(x), self.W_value(x)
        s = attention_scores(q, k)
        {mask}
        return context_vectors(self.dropout(attention_weights(s, k.shape[-1])), v)
'''
add(_h("ch03", "ch03_causal_attention", "mask stored as a buffer", CAUSAL.format(mask="s = s.masked_fill(self.mask[:t, :t], -torch.inf)")))
add(_h("ch03", "ch03_causal_attention", "no causal mask", CAUSAL.format(mask="pass"), "ch03_causal_attention"))
MHA = '''
class MultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        self.h, self.hd, self.context_length = num_heads, d_out // num_heads, context_length
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)  # per head: its q, k and v side by side
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        b, t, _ = x.shape
        if t > self.context_length:
            raise ValueError("too long")
        q, k, v = self.qkv(x).view(b, t, self.h, 3, self.hd).permute(3, 0, 2, 1, 4)
        s = attention_scores(q, k).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        ctx = context_vectors(self.dropout(attention_weights(s, self.hd)), v).transpose(1, 2).reshape(b, t, -1)
        return {out}
'''
add(_h("ch03", "ch03_multihead_attention", "one fused projection laid out per head", MHA.format(out="self.out_proj(ctx)")))
add(_h("ch03", "ch03_multihead_attention", "out_proj never applied", MHA.format(out="ctx"), "ch03_multihead_attention"))

# --- ch04 --------------------------------------------------------------------------------
LAYER_NORM = '''
class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction={correction})
        return self.scale * (x - mean) * torch.rsqrt(var + self.eps) + self.shift
'''
add(_h("ch04", "ch04_layer_norm", "var_mean and rsqrt", LAYER_NORM.format(correction=0)))
add(_h("ch04", "ch04_layer_norm", "unbiased variance (used by block and model)", LAYER_NORM.format(correction=1), "ch04_layer_norm"))
GELU = '''
class GELU(nn.Module):
    def forward(self, x):
        return {formula}
'''
add(_h("ch04", "ch04_gelu", "torch's tanh GELU", GELU.format(formula='torch.nn.functional.gelu(x, approximate="tanh")')))
add(_h("ch04", "ch04_gelu", "exact erf GELU (used by feed-forward, block, model)",
       GELU.format(formula="0.5 * x * (1 + torch.erf(x / math.sqrt(2)))"), "ch04_gelu"))
add(_h("ch04", "ch04_gelu", "ReLU (used by feed-forward, block, model)", GELU.format(formula="torch.relu(x)"), "ch04_gelu"))
FEED_FORWARD = '''
class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim), {act}, nn.Linear(4 * cfg.emb_dim, cfg.emb_dim))

    def forward(self, x):
        return self.layers(x)
'''
add(_h("ch04", "ch04_feed_forward", "reference GELU module", FEED_FORWARD.format(act="ref.GELU()")))
add(_h("ch04", "ch04_feed_forward", "ReLU instead of GELU", FEED_FORWARD.format(act="nn.ReLU()"), "ch04_feed_forward"))
BLOCK = '''
class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm(cfg.emb_dim), LayerNorm(cfg.emb_dim)
        self.att = MultiHeadAttention(cfg.emb_dim, cfg.emb_dim, cfg.context_length, cfg.drop_rate, cfg.n_heads, cfg.qkv_bias)
        self.ff = FeedForward(cfg)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        {body}
'''
add(_h("ch04", "ch04_transformer_block", "written step by step",
       BLOCK.format(body="h = self.att(self.norm1(x))\n        x = self.drop_shortcut(h) + x\n        "
                         "return x + self.drop_shortcut(self.ff(self.norm2(x)))")))
add(_h("ch04", "ch04_transformer_block", "post-norm (used by the model)",
       BLOCK.format(body="x = self.norm1(x + self.drop_shortcut(self.att(x)))\n        "
                         "return self.norm2(x + self.drop_shortcut(self.ff(x)))"), "ch04_transformer_block"))
add(_h("ch04", "ch04_transformer_block", "no dropout on the shortcuts",
       BLOCK.format(body="x = x + self.att(self.norm1(x))\n        return x + self.ff(self.norm2(x))"),
       "ch04_transformer_block"))
GPT = '''
class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.ModuleList([TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def forward(self, idx):
        x = self.tok_emb(idx){pos}
        x = self.drop_emb(x)
        for block in self.trf_blocks:
            x = block(x)
        return self.out_head(self.final_norm(x))
'''
add(_h("ch04", "ch04_gpt_model", "ModuleList and a loop", GPT.format(pos=" + self.pos_emb.weight[: idx.shape[1]]")))
add(_h("ch04", "ch04_gpt_model", "no position embeddings", GPT.format(pos=""), "ch04_gpt_model"))
GREEDY = '''
def generate_text_simple(model, idx, max_new_tokens, context_size):
    {ctx}
        for _ in range(max_new_tokens):
            logits = model(idx[:, -context_size:])[:, {pos}, :]
            idx = torch.cat([idx, torch.topk(logits, 1, dim=-1).indices], dim=1)
    return idx
'''
add(_h("ch04", "ch04_greedy_generate", "topk, one no_grad block", GREEDY.format(ctx="with torch.no_grad():", pos=-1)))
add(_h("ch04", "ch04_greedy_generate", "reads the first position", GREEDY.format(ctx="with torch.no_grad():", pos=0),
       "ch04_greedy_generate"))
add(_h("ch04", "ch04_greedy_generate", "gradients on", GREEDY.format(ctx="if True:", pos=-1), "ch04_greedy_generate"))

# --- ch05 --------------------------------------------------------------------------------
LOSS_BATCH = '''
def calc_loss_batch(input_batch, target_batch, model, device):
    logits = model(input_batch.to(device))
    log_probs = torch.log_softmax(logits, dim=-1).flatten(0, 1)
    targets = target_batch.to(device).flatten()
    keep = targets != -100
    picked = log_probs[keep].gather(1, targets[keep].unsqueeze(1))
    return {reduce}
'''
add(_h("ch05", "ch05_loss_batch", "log-softmax and gather", LOSS_BATCH.format(reduce="-picked.mean()")))
add(_h("ch05", "ch05_loss_batch", "summed, not averaged (used by loader and loop)", LOSS_BATCH.format(reduce="-picked.sum()"),
       "ch05_loss_batch"))
LOSS_LOADER = '''
def calc_loss_loader(data_loader, model, device, num_batches=None):
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    total, count = 0.0, 0
    {ctx}
        for i, (x, y) in zip(range(n), data_loader):
            k = int((y != -100).sum())
            if k:
                total += {loss} * k
                count += k
    return total / count if count else float("nan")
'''
add(_h("ch05", "ch05_loss_loader", "zip with a range", LOSS_LOADER.format(ctx="with torch.no_grad():", loss="calc_loss_batch(x, y, model, device).item()")))
add(_h("ch05", "ch05_loss_loader", "plain mean of the batch losses", '''
def calc_loss_loader(data_loader, model, device, num_batches=None):
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    losses = []
    with torch.no_grad():
        for i, (x, y) in enumerate(data_loader):
            if i >= n:
                break
            losses.append(calc_loss_batch(x, y, model, device).item())
    return sum(losses) / len(losses) if losses else float("nan")
''', "ch05_loss_loader"))
add(_h("ch05", "ch05_loss_loader", "gradients on", LOSS_LOADER.format(ctx="if True:", loss="calc_loss_batch(x, y, model, device).item()"),
       "ch05_loss_loader"))
TRAIN = '''
def train_language_model(model, train_loader, val_loader, optimizer, device, num_epochs, eval_every, eval_batches):
    rows = {{"step": [], "seen": [], "train_loss": [], "val_loss": []}}
    total_steps, step, seen = num_epochs * len(train_loader), 0, 0

    def evaluate():
        {eval_mode}
        rows["train_loss"].append(calc_loss_loader(train_loader, model, device, eval_batches))
        rows["val_loss"].append(calc_loss_loader(val_loader, model, device, eval_batches))
        model.train()
        rows["step"].append(step)
        rows["seen"].append(seen)

    evaluate()
    for _ in range(num_epochs):
        model.train()
        for x, y in train_loader:
            {zero}
            loss = calc_loss_batch(x, y, model, device)
            loss.backward()
            optimizer.step()
            step, seen = step + 1, seen + x.numel()
            if step % eval_every == 0 or step == total_steps:
                evaluate()
    return rows
'''
add(_h("ch05", "ch05_train_loop", "an inner evaluate()", TRAIN.format(eval_mode="model.eval()", zero="optimizer.zero_grad()")))
add(_h("ch05", "ch05_train_loop", "no zero_grad", TRAIN.format(eval_mode="model.eval()", zero="pass"), "ch05_train_loop"))
add(_h("ch05", "ch05_train_loop", "evaluates in train mode", TRAIN.format(eval_mode="pass", zero="optimizer.zero_grad()"),
       "ch05_train_loop"))
PROBS = '''
def sampling_probs(logits, temperature=1.0, top_k=None):
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.sort(dim=-1, descending=True).values[:, top_k - 1 : top_k]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    return torch.softmax(logits {op} temperature, dim=-1)
'''
add(_h("ch05", "ch05_sampling_probs", "sort and where", PROBS.format(op="/")))
add(_h("ch05", "ch05_sampling_probs", "multiplies by the temperature (used by the sampler)", PROBS.format(op="*"),
       "ch05_sampling_probs"))
SAMPLE = '''
def sample_next_token(logits, temperature=0.0, top_k=None, generator=None):
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = sampling_probs(logits, temperature, top_k)
    u = torch.rand(probs.shape[0], 1, generator={gen}, dtype=probs.dtype)
    ids = (probs.cumsum(dim=-1) < u).sum(dim=-1, keepdim=True)
    return ids.clamp(max=probs.shape[-1] - 1)
'''
add(_h("ch05", "ch05_sample_next_token", "inverse CDF", SAMPLE.format(gen="generator")))
add(_h("ch05", "ch05_sample_next_token", "ignores the generator", SAMPLE.format(gen="None"), "ch05_sample_next_token"))

# --- ch06 --------------------------------------------------------------------------------
HEAD = '''
def add_classification_head(model, num_classes=2, train_last_blocks=1):
    model.requires_grad_({freeze})
    model.out_head = nn.Linear(model.final_norm.scale.shape[0], num_classes)
    model.final_norm.requires_grad_(True)
    for block in list(model.trf_blocks)[len(model.trf_blocks) - train_last_blocks:]:
        block.requires_grad_(True)
    return model
'''
add(_h("ch06", "ch06_classification_head", "requires_grad_ on modules", HEAD.format(freeze="False")))
add(_h("ch06", "ch06_classification_head", "nothing frozen", HEAD.format(freeze="True"), "ch06_classification_head"))
ACCURACY = '''
def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    {mode}
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    hits = []
    with torch.no_grad():
        for _, (x, y) in zip(range(n), data_loader):
            hits.append(model(x.to(device))[:, -1].argmax(-1) == y.to(device))
    return torch.cat(hits).float().mean().item()
'''
add(_h("ch06", "ch06_accuracy", "concatenated hits", ACCURACY.format(mode="model.eval()")))
add(_h("ch06", "ch06_accuracy", "no eval mode", ACCURACY.format(mode="pass"), "ch06_accuracy"))
add(_h("ch06", "ch06_classification_loss", "log-softmax by hand", '''
def calc_loss_batch_classification(input_batch, target_batch, model, device):
    last = model(input_batch.to(device))[:, -1, :]
    return -torch.log_softmax(last, dim=-1).gather(1, target_batch.to(device).unsqueeze(1)).mean()
'''))
add(_h("ch06", "ch06_classification_loss", "first position", '''
def calc_loss_batch_classification(input_batch, target_batch, model, device):
    return F.cross_entropy(model(input_batch.to(device))[:, 0, :], target_batch.to(device))
''', "ch06_classification_loss"))

# --- ch07 --------------------------------------------------------------------------------
add(_h("ch07", "ch07_format_input", "joined parts", '''
def format_input(entry):
    parts = [PREAMBLE, "### Instruction:\\n" + entry["instruction"]]
    if entry.get("input"):
        parts.append("### Input:\\n" + entry["input"])
    return "\\n\\n".join(parts)
'''))
add(_h("ch07", "ch07_format_input", "input section always", '''
def format_input(entry):
    return f"{PREAMBLE}\\n\\n### Instruction:\\n{entry['instruction']}\\n\\n### Input:\\n{entry.get('input', '')}"
''', "ch07_format_input"))
COLLATE = '''
def instruction_collate(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, mask_prompt=False):
    pairs = [item if isinstance(item, tuple) else (item, 0) for item in batch]
    width = max(len(ids) for ids, _ in pairs) + 1
    inputs = torch.full((len(pairs), width - 1), pad_token_id, dtype=torch.long)
    targets = torch.full((len(pairs), width - 1), ignore_index, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(pairs):
        n = len(ids)
        inputs[row, :n] = torch.tensor(ids, dtype=torch.long)
        targets[row, : n - 1] = torch.tensor(ids[1:], dtype=torch.long)
        {eot}
        if mask_prompt:
            targets[row, : max(prompt_length {off}, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets
'''
add(_h("ch07", "ch07_collate", "filled tensors", COLLATE.format(eot="targets[row, n - 1] = pad_token_id", off="- 1")))
add(_h("ch07", "ch07_collate", "no end-of-text target kept (plain collate only)", COLLATE.format(eot="pass", off="- 1"),
       "ch07_collate"))
add(_h("ch07", "ch07_collate", "prompt mask one too long (mask_prompt only)",
       COLLATE.format(eot="targets[row, n - 1] = pad_token_id", off=""), "ch07_collate_prompt_mask"))

# --- appendix A --------------------------------------------------------------------------
add(_h("appendix_a", "appendix_a_pairwise_distances", "expanded square", '''
def pairwise_sq_distances(a, b):
    return (a**2).sum(-1, keepdim=True) - 2 * a @ b.transpose(-2, -1) + (b**2).sum(-1).unsqueeze(-2)
'''))
add(_h("appendix_a", "appendix_a_pairwise_distances", "distances, not squared", '''
def pairwise_sq_distances(a, b):
    return ((a.unsqueeze(-2) - b.unsqueeze(-3)) ** 2).sum(-1).sqrt()
''', "appendix_a_pairwise_distances"))
add(_h("appendix_a", "appendix_a_loss_and_grads", "the formulas by hand", '''
def loss_and_grads(x, y, w, b):
    p = torch.sigmoid(x @ w + b)
    loss = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    return loss, x.T @ (p - y) / len(y), (p - y).mean()
'''))
add(_h("appendix_a", "appendix_a_loss_and_grads", "summed loss", '''
def loss_and_grads(x, y, w, b):
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    loss = F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="sum")
    loss.backward()
    return loss.detach(), w.grad, b.grad
''', "appendix_a_loss_and_grads"))
MLP = '''
class MLP(nn.Module):
    def __init__(self, n_inputs, n_hidden, n_classes):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(n_inputs, n_hidden), {act}, nn.Linear(n_hidden, n_hidden), {act},
                                    nn.Linear(n_hidden, n_classes))

    def forward(self, x):
        return self.layers(x)
'''
add(_h("appendix_a", "appendix_a_mlp", "ReLU(inplace=True)", MLP.format(act="nn.ReLU(inplace=True)")))
add(_h("appendix_a", "appendix_a_mlp", "no activations", MLP.format(act="nn.Identity()"), "appendix_a_mlp"))
EPOCHS = '''
def train_epochs(model, train_loader, optimizer, num_epochs):
    out = []
    for _ in range(num_epochs):
        model.train()
        total, n = 0.0, 0
        for x, y in train_loader:
            {zero}
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            total, n = total + loss.item(), n + 1
        out.append(total / n)
    return out
'''
add(_h("appendix_a", "appendix_a_train_epochs", "running sums", EPOCHS.format(zero="optimizer.zero_grad()")))
add(_h("appendix_a", "appendix_a_train_epochs", "no zero_grad", EPOCHS.format(zero="pass"), "appendix_a_train_epochs"))

# --- appendix D --------------------------------------------------------------------------
LR = '''
def lr_at_step(step, total_steps, peak_lr, warmup_steps, initial_lr=0.0, min_lr=0.0):
    t = lambda v: torch.tensor(v, dtype=torch.float32)
    if step < warmup_steps:
        return float(t(initial_lr) + (t(peak_lr) - t(initial_lr)) * t({step}) / t(warmup_steps))
    decay = total_steps - 1 - warmup_steps
    if decay <= 0:
        return float(t(peak_lr))
    progress = torch.clamp(t(step - warmup_steps) / t(decay), max=1.0)
    return float(t(min_lr) + (t(peak_lr) - t(min_lr)) * 0.5 * (1 + torch.cos(math.pi * progress)))
'''
add(_h("appendix_d", "appendix_d_lr_schedule", "float32 tensors", LR.format(step="step")))
add(_h("appendix_d", "appendix_d_lr_schedule", "warm-up one step ahead (float32)", LR.format(step="step + 1"),
       "appendix_d_lr_schedule"))
add(_h("appendix_d", "appendix_d_clip_grad_norm", "torch's own", '''
def clip_grad_norm(parameters, max_norm):
    return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
'''))
add(_h("appendix_d", "appendix_d_clip_grad_norm", "each gradient clipped on its own", '''
def clip_grad_norm(parameters, max_norm):
    params = [p for p in parameters if p.grad is not None]
    total = torch.sqrt(sum((p.grad**2).sum() for p in params))
    for p in params:
        norm = p.grad.norm()
        if norm > max_norm:
            p.grad.mul_(max_norm / (norm + 1e-6))
    return total
''', "appendix_d_clip_grad_norm"))

# --- appendix E --------------------------------------------------------------------------
LORA = '''
class LoRALayer(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.randn(in_dim, rank) / math.sqrt(in_dim))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.scaling = {scaling}

    def forward(self, x):
        return (x @ self.A) @ self.B * self.scaling
'''
add(_h("appendix_e", "appendix_e_lora_layer", "randn / sqrt(in_dim)", LORA.format(scaling="alpha / rank")))
add(_h("appendix_e", "appendix_e_lora_layer", "scaled by alpha (used by wrapper and replace)", LORA.format(scaling="alpha"),
       "appendix_e_lora_layer"))
add(_h("appendix_e", "appendix_e_lora_layer", "B random (used by wrapper and replace)", '''
class LoRALayer(nn.Module):
    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.randn(in_dim, rank))
        self.B = nn.Parameter(torch.randn(rank, out_dim))
        self.scaling = alpha / rank

    def forward(self, x):
        return self.scaling * (x @ self.A @ self.B)
''', "appendix_e_lora_layer"))
WRAPPER = '''
class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return {out}
'''
add(_h("appendix_e", "appendix_e_linear_with_lora", "update first", WRAPPER.format(out="self.lora(x) + self.linear(x)")))
add(_h("appendix_e", "appendix_e_linear_with_lora", "only the update (used by replace)", WRAPPER.format(out="self.lora(x)"),
       "appendix_e_linear_with_lora"))
REPLACE = '''
def replace_linear_with_lora(model, rank, alpha):
    model.requires_grad_(False)
    for name, module in list(model.{walk}()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, LinearWithLoRA(child, rank, alpha))
    return model
'''
add(_h("appendix_e", "appendix_e_replace_linear", "named_modules instead of recursion", REPLACE.format(walk="named_modules")))
add(_h("appendix_e", "appendix_e_replace_linear", "only the model's direct children", '''
def replace_linear_with_lora(model, rank, alpha):
    model.requires_grad_(False)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, LinearWithLoRA(child, rank, alpha))
    return model
''', "appendix_e_replace_linear"))
