"""Random PEFT adapters and the transformers + peft reference they are checked against."""
from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_path: Path, out_dir: Path, *, r: int = 8, alpha: float = 16, targets=("q_proj", "v_proj"),
                 seed: int = 0, use_rslora: bool = False, std: float = 0.05, **extra) -> Path:
    """A PEFT LoRA adapter for ``base_path`` with random A and B (PEFT starts B at zero, which
    would make the adapter a no-op), saved with ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none",
                     use_rslora=use_rslora, task_type="CAUSAL_LM", **extra)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def _reference_model(base_path: Path, adapter_path: Path | None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_path)).eval()
    return model


def peft_greedy(base_path: Path, adapter_path: Path | None, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy continuations of transformers + peft (a plain decode loop, EOS an ordinary token),
    with each step's top-2 logit gap, in the shape ``assert_greedy_match`` reads."""
    model = _reference_model(base_path, adapter_path)
    results = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            tokens, gaps = [], []
            for _ in range(max_new_tokens):
                top2 = out.logits[0, -1].float().topk(2)
                gaps.append(float(top2.values[0] - top2.values[1]))
                tok = int(top2.indices[0])
                tokens.append(tok)
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            results.append({"tokens": tokens, "gaps": gaps})
    return results


def peft_prompt_logprobs(base_path: Path, adapter_path: Path | None, ids: list[int]) -> torch.Tensor:
    """log p(ids[i] | ids[:i]) for i >= 1 under transformers + peft."""
    model = _reference_model(base_path, adapter_path)
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    return lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
