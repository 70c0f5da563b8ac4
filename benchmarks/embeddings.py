"""Embeddings per second: the engine's pooling requests against sentence-transformers, one run.

    python benchmarks/embeddings.py                        # 64 workload prompts, SmolLM2, both systems
    python benchmarks/embeddings.py --num-requests 16      # quick

The prompts are the throughput benchmark's seeded workload (benchmarks/throughput.py
``make_workload``: random token ids, 16..512 tokens). Both systems run the same weights in fp32 with
the same pooling: the model directory is given a sentence-transformers config (last-token
pooling, then Normalize), which the engine reads too. sentence-transformers runs the way its
``encode`` does (length-sorted batches of ``--st-batch-size``, right-padded), fed the token ids
directly so both see identical inputs. The engine runs without prefix caching (repeats would hit
it). Each system embeds the whole set ``--repeats`` times; the
best time counts (the machine is shared). The two sets of vectors are compared (min cosine).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_workload  # noqa: E402


def st_model_dir(model_dir: Path, out: Path) -> Path:
    """A sentence-transformers view of ``model_dir`` (links to its files, plus the ST config)."""
    for f in model_dir.iterdir():
        if f.is_file():
            (out / f.name).symlink_to(f)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 2048, "do_lower_case": False}))
    (out / "1_Pooling").mkdir()
    (out / "2_Normalize").mkdir()
    hidden = json.loads((model_dir / "config.json").read_text())["hidden_size"]
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": hidden, "pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False,
         "pooling_mode_cls_token": False}))
    return out


def run_engine(path: Path, prompts: list[list[int]], repeats: int) -> tuple[float, torch.Tensor]:
    from engine.entrypoints.llm import LLM

    # no prefix caching: a repeat would otherwise be served from the cache (last-token pooling reads it)
    llm = LLM(str(path), dtype="float32", enable_prefix_caching=False)
    best, vecs = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        outs = llm.embed([{"prompt_token_ids": p} for p in prompts], use_tqdm=False)
        best = min(best, time.perf_counter() - start)
        vecs = torch.tensor([o.outputs.embedding for o in outs])
    llm.shutdown()
    return best, vecs


def run_st(path: Path, prompts: list[list[int]], repeats: int, batch_size: int) -> tuple[float, torch.Tensor]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(path), device="cpu")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # as encode sorts (longest first)
    pad = st.tokenizer.pad_token_id if st.tokenizer.pad_token_id is not None else st.tokenizer.eos_token_id
    best, vecs = float("inf"), None
    for _ in range(repeats):
        out = [None] * len(prompts)
        start = time.perf_counter()
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                n = max(len(prompts[i]) for i in idx)
                ids = torch.full((len(idx), n), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), n), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, : len(prompts[i])] = torch.tensor(prompts[i])
                    mask[r, : len(prompts[i])] = 1
                emb = st.forward({"input_ids": ids, "attention_mask": mask})["sentence_embedding"]
                for r, i in enumerate(idx):
                    out[i] = emb[r].float()
        best = min(best, time.perf_counter() - start)
        vecs = torch.stack(out)
    return best, vecs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--st-batch-size", type=int, default=32, help="sentence-transformers' encode default")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--plot", default="docs/embeddings_benchmark.png")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from engine.config import load_hf_config
    from engine.models.default_model import resolve_model_path

    model_dir = Path(resolve_model_path(args.model))
    prompts = make_workload(args.num_requests, load_hf_config(model_dir).vocab_size, args.seed).prompts
    num_tokens = sum(len(p) for p in prompts)
    print(f"workload: {len(prompts)} prompts, {num_tokens} tokens; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = st_model_dir(model_dir, Path(tmp))
        t_engine, v_engine = run_engine(path, prompts, args.repeats)
        t_st, v_st = run_st(path, prompts, args.repeats, args.st_batch_size)
    cos = torch.nn.functional.cosine_similarity(v_engine, v_st, dim=-1)
    def rates(seconds: float) -> dict:
        return {"seconds": seconds, "embeddings_per_s": len(prompts) / seconds, "tokens_per_s": num_tokens / seconds}

    results = {"engine": rates(t_engine), "sentence-transformers": rates(t_st), "min_cosine": float(cos.min())}
    for name in ("engine", "sentence-transformers"):
        r = results[name]
        print(f"{name:>22}: {r['seconds']:.2f} s, {r['embeddings_per_s']:.2f} embeddings/s, "
              f"{r['tokens_per_s']:.0f} tokens/s")
    print(f"min cosine engine vs sentence-transformers: {results['min_cosine']:.7f}")
    print(json.dumps(results))
    if args.plot:
        plot(Path(args.plot), results, f"{len(prompts)} workload prompts ({num_tokens} tokens), SmolLM2-135M fp32, CPU")


def plot(path: Path, results: dict, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from engine.bench.plots import DPI, FIG_SIZE_IN

    names = ["engine", "sentence-transformers"]
    fig, ax = plt.subplots(figsize=FIG_SIZE_IN)
    bars = ax.bar(names, [results[n]["embeddings_per_s"] for n in names], color=["#2f5bea", "#8c95a8"])
    ax.bar_label(bars, labels=[f"{results[n]['embeddings_per_s']:.3f}/s ({results[n]['tokens_per_s']:.0f} tok/s)"
                               for n in names])
    ax.set_ylabel("embeddings / s")
    ax.set_title(title)
    fig.tight_layout()
    os.makedirs(path.parent, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    print(f"plot: {path}")

if __name__ == "__main__":
    main()
