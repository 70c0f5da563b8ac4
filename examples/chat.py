"""Chat with the embedded default model (SmolLM2-135M-Instruct) through its chat template.

    python examples/chat.py            # a scripted multi-turn conversation and a batch of chats
    python examples/chat.py --interactive

The command-line equivalent of one turn: python -m engine generate --chat "What is 2 + 2?"
"""
import argparse

from engine import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="local Hugging Face model directory (default: SmolLM2)")
    parser.add_argument("--interactive", action="store_true")
    args = parser.parse_args()

    llm = LLM(args.model)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, repetition_penalty=1.1, seed=0)

    conversation = [{"role": "system", "content": "You are a concise, helpful assistant."}]
    if args.interactive:
        while True:
            try:
                user = input("you> ").strip()
            except EOFError:
                break
            if not user:
                break
            conversation.append({"role": "user", "content": user})
            reply = llm.chat(conversation, params, use_tqdm=False)[0].outputs[0].text
            print(f"bot> {reply}")
            conversation.append({"role": "assistant", "content": reply})
        return

    # a multi-turn conversation: each reply goes back into the history
    for user in ("What is the capital of France?", "And roughly how many people live there?"):
        conversation.append({"role": "user", "content": user})
        out = llm.chat(conversation, params, use_tqdm=False)[0]
        reply = out.outputs[0].text
        print(f"user: {user}\nassistant: {reply}\n")
        conversation.append({"role": "assistant", "content": reply})

    # several independent conversations in one batch, with logprobs of each reply token
    batch = [
        [{"role": "user", "content": "Name three primary colors."}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    greedy = SamplingParams(temperature=0.0, max_tokens=48, logprobs=1)
    for out in llm.chat(batch, greedy, use_tqdm=False):
        c = out.outputs[0]
        print(f"{out.prompt!r}\n-> {c.text!r} ({c.finish_reason}, cumulative logprob {c.cumulative_logprob:.2f})\n")


if __name__ == "__main__":
    main()
