"""The golden prompts: plain text and chat-template prompts from 5 to about 500 tokens."""
from __future__ import annotations

_PASSAGE = (
    "The history of computing is often told as a story of machines, but it is equally a story of "
    "ideas about how to organise work. Early tabulating machines sorted punched cards for the census; "
    "later, stored-program computers let a single device follow any list of instructions. Operating "
    "systems arose to share one expensive processor among many users, and with them came the problem "
    "of memory: how to give every program the illusion of a large, private address space while the "
    "physical memory was small and shared. Paging answered that question by cutting memory into fixed-size "
    "pages and keeping, for each program, a table that maps its virtual pages to physical frames. "
    "Pages could be loaded on demand, swapped out to disk when memory ran short, and shared between "
    "programs that used the same code. Decades later, the same idea returned in an unexpected place: "
    "serving large language models. Each request being generated keeps a cache of keys and values for "
    "every token it has seen, and that cache grows one token at a time. Allocating it contiguously wastes "
    "memory, because nobody knows in advance how long an answer will be. Cutting the cache into blocks and "
    "keeping a block table per request lets a server pack many more requests into the same memory, share "
    "the blocks of a common prompt prefix, and preempt a request by freeing its blocks when memory runs out. "
)

PLAIN_PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "List three prime numbers greater than 100:",
    "Translate to French: The weather is nice today.",
    "Summarise the following text in one sentence.\n\n" + _PASSAGE,
    _PASSAGE + _PASSAGE[:1000] + "\n\nQuestion: what problem did paging solve? Answer:",
]

CHAT_CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 times 7?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name two uses of a hash table."},
    ],
    [{"role": "user", "content": "Explain in two sentences why caching helps:\n" + _PASSAGE[:600]}],
]


def golden_prompt_ids(tokenizer) -> list[list[int]]:
    ids = [tokenizer.encode(p) for p in PLAIN_PROMPTS]
    for conv in CHAT_CONVERSATIONS:
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids.append(tokenizer.encode(text, add_special_tokens=False))
    return ids
