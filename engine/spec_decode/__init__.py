"""Speculative decoding: proposers (n-gram prompt lookup, a draft model), exact rejection sampling
in the target's step, and acceptance statistics. See docs/spec_decode.md."""
