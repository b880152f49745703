"""Which text path generalises to phrasings it never saw? A probe that answers it cheaply.

For each candidate text path (tokenizer, normalisation, position scheme) a small TextEncoder
with one linear head per attribute learns to read the four `shapes` attributes from train
captions, and is then scored on captions phrased only with the caption grammar's held-out
constructions: on seen (color, shape) pairs, on the held-out pairs, and on the same captions
upper-cased with doubled spaces (whose predictions should not change). No image model is
trained, so the comparison isolates the text path: every text-conditioned family reads its
captions through it.

    python -m mmjax.eval.text_probe --steps 400 --seeds 0 1

prints one table row per candidate (RESULTS.md records the comparison and the choice).
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax

from mmjax.data import shapes
from mmjax.data import tokenizer as tokenizers
from mmjax.models.text import TextEncoder

ATTRIBUTES = tuple(shapes.ATTRIBUTES)


@dataclasses.dataclass(frozen=True)
class Candidate:
    tokenizer: str
    normalize: bool
    positions: str

    @property
    def name(self) -> str:
        return f"{self.tokenizer}, {'normalised' if self.normalize else 'as written'}, {self.positions} positions"


CANDIDATES = (
    Candidate("byte", False, "learned"),  # the path every model before this comparison used
    Candidate("byte", True, "learned"),
    Candidate("byte", True, "rotary"),
    Candidate("word", False, "rotary"),
    Candidate("word", True, "learned"),
    Candidate("word", True, "rotary"),
    Candidate("word", True, "none"),
)


def _records(split: str, count: int, seed: int, share: float | None = None) -> list[dict]:
    source = shapes.ShapesSource(split, seed=seed, num_records=count, heldout_phrasing_share=share)
    return [source._record(i, draw=False) for i in range(count)]


def _labels(records) -> np.ndarray:
    return np.asarray([[int(r[a]) for a in ATTRIBUTES] for r in records], np.int32)


def _shouted(text: str) -> str:
    return "  ".join(text.upper().split(" "))


class Probe(nn.Module):
    """TextEncoder -> pooled vector -> one linear head per attribute."""

    encoder: TextEncoder

    @nn.compact
    def __call__(self, tokens):
        _, aux = self.encoder(tokens)
        return [nn.Dense(len(shapes.ATTRIBUTES[a]), name=f"head_{a}")(aux["pooled"]) for a in ATTRIBUTES]


def run(candidate: Candidate, train: list[dict], tests: dict[str, list[dict]], *, steps: int, seed: int,
        batch: int = 128, max_len: int = 64, width: int = 64, depth: int = 2, vocab_records: int = 5000) -> dict:
    if candidate.tokenizer == "word":
        tok = tokenizers.WordTokenizer.build([r["caption"] for r in train[:vocab_records]], max_len, 512,
                                             lowercase=candidate.normalize)
    else:
        tok = tokenizers.ByteTokenizer(max_len, lowercase=candidate.normalize)
    settings = tokenizers.encoder_settings({"text": {**dataclasses.asdict(candidate), "vocab_size": 512}})
    model = Probe(TextEncoder(width=width, depth=depth, num_heads=4, max_len=max_len, **settings))
    tokens = tok.encode([r["caption"] for r in train])
    labels = _labels(train)
    params = model.init(jax.random.key(seed), tokens[:2])["params"]
    opt = optax.adamw(1e-3, weight_decay=0.01)
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        logits = model.apply({"params": p}, x)
        return sum(optax.softmax_cross_entropy_with_integer_labels(lg, y[:, i]).mean()
                   for i, lg in enumerate(logits))

    @jax.jit
    def step(p, s, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    predict = jax.jit(lambda p, x: jnp.stack([jnp.argmax(lg, -1) for lg in model.apply({"params": p}, x)], -1))
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, len(tokens), batch)
        params, opt_state, _ = step(params, opt_state, tokens[idx], labels[idx])
    out = {}
    for name, records in tests.items():
        pred = np.asarray(predict(params, tok.encode([r["caption"] for r in records])))
        correct = pred == _labels(records)
        named = np.asarray([[shapes.parse_caption(r["caption"])[a] is not None for a in ATTRIBUTES]
                            for r in records])
        for i, a in enumerate(ATTRIBUTES):
            out[f"{name}/{a}"] = float(correct[named[:, i], i].mean()) if named[:, i].any() else float("nan")
        if name == "heldout":
            shouted = np.asarray(predict(params, tok.encode([_shouted(r["caption"]) for r in records])))
            out["case_invariance"] = float(np.mean(np.all(shouted == pred, axis=1)))
    long_prompt = ("please could you draw me one small red square, placed right at the top left corner "
                   "of the picture, on a plain black background")
    out["tokens_for_120_chars"] = int(np.sum(tok.encode([long_prompt[:120]])[0] != tokenizers.PAD))
    out["fits_120_chars"] = not tok.encode_with_count([long_prompt[:120]])[1]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train", type=int, default=5000, help="train captions")
    parser.add_argument("--test", type=int, default=1000, help="captions per test set")
    parser.add_argument("--candidates", type=int, nargs="+", help="rows of CANDIDATES to run (default: all)")
    args = parser.parse_args(argv)
    train = _records("train", args.train, 0)
    heldout = _records("test", args.test, 0, share=1.0)
    tests = {"train_phrasing": _records("test", args.test, 1, share=0.0),
             "heldout": [r for r in heldout if not r["unseen"]],
             "heldout_unseen": [r for r in heldout if r["unseen"]]}
    print(f"train {len(train)} captions; test: " + ", ".join(f"{k} {len(v)}" for k, v in tests.items()))
    head = ("| text path | train phrasings: color/shape/size/position | held-out phrasings: c/s/z/p | "
            "held-out on unseen pairs: c/s | case+space invariance | tokens, 120 chars |")
    print(head)
    print("|---|---|---|---|---|---|")
    for cand in [CANDIDATES[i] for i in args.candidates] if args.candidates else CANDIDATES:
        t0 = time.time()
        rows = [run(cand, train, tests, steps=args.steps, seed=s) for s in args.seeds]
        m = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        fmt = lambda pre, attrs: "/".join(f"{100 * m[f'{pre}/{a}']:.1f}" for a in attrs)  # noqa: E731
        order = ("color", "shape", "size", "position")
        print(f"| {cand.name} | {fmt('train_phrasing', order)} | {fmt('heldout', order)} | "
              f"{fmt('heldout_unseen', ('color', 'shape'))} | {100 * m['case_invariance']:.1f}% | "
              f"{int(m['tokens_for_120_chars'])}{'' if m['fits_120_chars'] == 1 else ' (cut)'} |"
              f"  <!-- {time.time() - t0:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
