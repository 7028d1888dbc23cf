"""Semantic score of the demo model: generate prompts of the shapes grammar, classify each picture with
tools/demo_shapes.classify (plain numpy), count the fully right ones, tabulate the confusions.

    python tools/demo_semantic_score.py                          # the shipped model, all 90 prompts x 3 seeds
    python tools/demo_semantic_score.py --model /tmp/demo --steps 1 2 4 --guidance 1 3 --markdown out.md

The CI test (tests/test_demo_model.py) runs score() on a seeded sample at the shipped defaults.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_shapes  # noqa: E402


def sample_triples(n: int | None, seed: int = 0) -> list[tuple[str, str, str]]:
    """n triples drawn without replacement over the whole grammar (all 90, in order, when n is None)."""
    triples = demo_shapes.all_triples()
    if n is None:
        return triples
    rng = np.random.default_rng(seed)
    return [triples[i] for i in rng.permutation(len(triples))[:n]]


def generate(engine, triples, *, seed: int, steps=None, guidance=None, batch: int = 30) -> list[np.ndarray]:
    images = []
    for i in range(0, len(triples), batch):
        prompts = [demo_shapes.prompt_of(*t) for t in triples[i:i + batch]]
        out = engine.generate(prompts, seed=seed + i, num_inference_steps=steps, guidance_scale=guidance,
                              output_type="np").images
        images += [np.round(np.asarray(im) * 255).astype(np.uint8) for im in out]
    return images


def score(engine, triples, *, seed: int = 0, steps=None, guidance=None) -> dict:
    """Fraction fully right, per-part accuracy and the confusions (wanted -> got) of each part."""
    got = [demo_shapes.classify(im) for im in generate(engine, triples, seed=seed, steps=steps, guidance=guidance)]
    parts = ("foreground", "shape", "background")
    result = {"n": len(triples), "correct": sum(g == t for g, t in zip(got, triples))}
    result["accuracy"] = result["correct"] / len(triples)
    for k, name in enumerate(parts):
        pairs = [(t[k], g[k]) for t, g in zip(triples, got)]
        result[f"{name}_accuracy"] = sum(a == b for a, b in pairs) / len(pairs)
        result[f"{name}_confusions"] = Counter((a, b) for a, b in pairs if a != b)
    result["failures"] = [(t, g) for t, g in zip(triples, got) if t != g]
    return result


def _confusions(r: dict) -> str:
    items = []
    for name in ("foreground", "shape", "background"):
        items += [f"{name} {a}->{b} x{c}" for (a, b), c in r[f"{name}_confusions"].most_common()]
    return ", ".join(items) or "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--steps", type=int, nargs="+", default=[None])
    p.add_argument("--guidance", type=float, nargs="+", default=[None])
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt (all 90 prompts each time)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    p.add_argument("--save-grid", type=Path, default=None, help="PNG of the first seed's 90 pictures")
    args = p.parse_args(argv)

    import torch

    from ldm_engine.engine import Engine

    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model, device="cpu")
    triples = sample_triples(None)
    lines = ["| steps | guidance | fully right | foreground | shape | background | s / image | confusions (wanted->got) |",
             "|---|---|---|---|---|---|---|---|"]
    for steps in args.steps:
        for guidance in args.guidance:
            rs, t0 = [], time.perf_counter()
            for s in range(args.seeds):
                rs.append(score(engine, triples, seed=1000 * s, steps=steps, guidance=guidance))
            per_image = (time.perf_counter() - t0) / (len(triples) * args.seeds)
            merged = {k: sum((r[k] for r in rs), Counter()) for k in rs[0] if k.endswith("confusions")}
            n = sum(r["n"] for r in rs)
            acc = {k: sum(r[k] * r["n"] for r in rs) / n for k in rs[0] if k.endswith("accuracy")}
            st = steps or engine.defaults.num_inference_steps
            gd = guidance if guidance is not None else engine.defaults.guidance_scale
            line = (f"| {st} | {gd:g} | {sum(r['correct'] for r in rs)}/{n} = {acc['accuracy']:.1%} | "
                    f"{acc['foreground_accuracy']:.1%} | {acc['shape_accuracy']:.1%} | "
                    f"{acc['background_accuracy']:.1%} | {per_image:.3f} | {_confusions(merged)} |")
            lines.append(line)
            print(line, flush=True)
    if args.save_grid is not None:
        from PIL import Image

        imgs = generate(engine, triples, seed=0, steps=args.steps[0], guidance=args.guidance[0])
        grid = np.concatenate([np.concatenate(imgs[r * 15:(r + 1) * 15], axis=1) for r in range(6)], axis=0)
        Image.fromarray(grid).save(args.save_grid)
    if args.markdown is not None:
        with args.markdown.open("a") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
