"""Anthropic's Messages API (``POST /v1/messages``) on the same engine: protocol.py reads a request
into the chat machinery's terms, serving.py generates and answers in Anthropic's shapes."""
