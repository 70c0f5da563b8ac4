"""Offline batch generation on the embedded default model (SmolLM2-135M-Instruct).

    python examples/offline_inference.py
"""
from engine import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The capital of France is",
    "The future of AI is",
    "def quicksort(items):",
]

llm = LLM()  # pass a local Hugging Face model directory to use another Llama-family model
greedy = SamplingParams(temperature=0.0, max_tokens=48)
sampled = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48, seed=7)

for params in (greedy, sampled):
    for out in llm.generate(prompts, params):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")
print(llm.get_stats())
